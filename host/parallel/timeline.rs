//! Timelines: what each device did during a step (forward, backward, transfers, all-reduce,
//! the optimizer, idle), measured by the engine or simulated from a schedule, and drawn as an
//! SVG with a lane per device, so the bubble and the overlap can be seen.

use svg::node::element::{Group, Line, Rectangle, Text, Title};
use svg::Document;

use crate::parallel::schedule::{Action, Schedule};

/// What a span of time was spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Forward of a microbatch.
    Forward,
    /// Backward of a microbatch.
    Backward,
    /// Sending or receiving an activation or gradient (receives include the wait).
    Transfer,
    /// All-reduce of a gradient bucket (on the device's communication thread).
    AllReduce,
    /// The optimizer step.
    Optimizer,
    /// Waiting.
    Idle,
}

impl SpanKind {
    fn colour(self) -> &'static str {
        match self {
            SpanKind::Forward => "#4c78a8",
            SpanKind::Backward => "#f58518",
            SpanKind::Transfer => "#b8b8b8",
            SpanKind::AllReduce => "#54a24b",
            SpanKind::Optimizer => "#b279a2",
            SpanKind::Idle => "#eeeeee",
        }
    }
    fn name(self) -> &'static str {
        match self {
            SpanKind::Forward => "forward",
            SpanKind::Backward => "backward",
            SpanKind::Transfer => "transfer",
            SpanKind::AllReduce => "all-reduce",
            SpanKind::Optimizer => "optimizer",
            SpanKind::Idle => "idle",
        }
    }
}

/// A span of time on a device, in seconds from the start of the step (or schedule units).
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// What it was.
    pub kind: SpanKind,
    /// e.g. `F3`.
    pub label: String,
    /// Start.
    pub start: f64,
    /// End.
    pub end: f64,
}

/// Bytes one device sent during a step, by group: for each collective it took part in, what a
/// ring sends from each rank (an all-reduce of `n` bytes over `g` ranks `2 (g - 1) / g * n`, a
/// reduce-scatter or all-gather `(g - 1) / g * n`), and between pipeline stages the activations
/// and gradients it handed on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// In its data-parallel group: gradient all-reduces, or ZeRO's reduce-scatters and
    /// all-gathers, and the norm's exchange.
    pub dp: f64,
    /// In its tensor-parallel group: the sums inside the layers (and the norm's exchange).
    pub tp: f64,
    /// To the neighbouring pipeline stages.
    pub pp: f64,
    /// Collectives (dp and tp) it took part in.
    pub collectives: usize,
}

impl Traffic {
    /// Bytes a rank of a ring of `g` sends for a collective over `bytes` (`2 (g - 1) / g` of
    /// them for an all-reduce, `(g - 1) / g` for a reduce-scatter or an all-gather).
    pub fn ring(bytes: usize, g: usize, all_reduce: bool) -> f64 {
        let g = g.max(1) as f64;
        let f = if all_reduce { 2.0 } else { 1.0 };
        f * (g - 1.0) / g * bytes as f64
    }
    /// The sum of two devices' (or two steps') traffic.
    pub fn add(&self, o: &Traffic) -> Traffic {
        Traffic {
            dp: self.dp + o.dp,
            tp: self.tp + o.tp,
            pp: self.pp + o.pp,
            collectives: self.collectives + o.collectives,
        }
    }
}

/// One device's spans.
#[derive(Debug, Clone, PartialEq)]
pub struct Lane {
    /// The device (and its place in the mesh).
    pub name: String,
    /// What it sent during the step.
    pub sent: Traffic,
    /// Compute and transfer spans, from the device's own thread.
    pub spans: Vec<Span>,
    /// All-reduce spans, from its communication thread (they overlap the others).
    pub comm: Vec<Span>,
}

/// Every device's spans during one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// One lane per device.
    pub lanes: Vec<Lane>,
    /// Length of the step.
    pub total: f64,
}

impl Timeline {
    /// The planned timeline of a schedule: a forward takes `fwd[s]`, a backward `bwd[s]`.
    pub fn from_schedule(schedule: &Schedule, fwd: &[f64], bwd: &[f64], names: &[String]) -> Timeline {
        let (spans, total) = schedule.simulate(fwd, bwd);
        let lanes = spans
            .into_iter()
            .enumerate()
            .map(|(s, sp)| Lane {
                name: names.get(s).cloned().unwrap_or_else(|| format!("stage {s}")),
                sent: Traffic::default(),
                spans: sp
                    .into_iter()
                    .map(|(a, b, act)| {
                        let (kind, label) = match act {
                            Action::Forward(m) => (SpanKind::Forward, format!("F{m}")),
                            _ => (SpanKind::Backward, format!("{act}")),
                        };
                        Span { kind, label, start: a, end: b }
                    })
                    .collect(),
                comm: vec![],
            })
            .collect();
        Timeline { lanes, total }
    }

    /// The fraction of the step the devices spent outside forward and backward, averaged over
    /// the devices: the measured counterpart of the bubble `(p - 1) / (m + p - 1)`.
    pub fn idle_fraction(&self) -> f64 {
        if self.lanes.is_empty() || self.total <= 0.0 {
            return 0.0;
        }
        let busy: f64 = self
            .lanes
            .iter()
            .map(|l| {
                l.spans
                    .iter()
                    .filter(|s| matches!(s.kind, SpanKind::Forward | SpanKind::Backward))
                    .map(|s| s.end - s.start)
                    .sum::<f64>()
            })
            .sum();
        1.0 - busy / (self.total * self.lanes.len() as f64)
    }

    /// The timeline as an SVG document: a lane per device (its all-reduce thread in a thin
    /// band under it), a time axis, and a legend.
    pub fn to_svg(&self, title: &str, unit: &str) -> String {
        let (left, width, lane_h, top) = (260.0, 900.0, 34.0, 50.0);
        let scale = if self.total > 0.0 { width / self.total } else { 1.0 };
        let height = top + lane_h * self.lanes.len() as f64 + 70.0;
        let mut doc = Document::new()
            .set("viewBox", (0, 0, left + width + 80.0, height))
            .set("width", left + width + 80.0)
            .set("height", height)
            .set("font-family", "sans-serif")
            .set("font-size", 12);
        doc = doc.add(Text::new(title).set("x", 10).set("y", 22).set("font-size", 15));
        for (i, lane) in self.lanes.iter().enumerate() {
            let y = top + i as f64 * lane_h;
            let mut g = Group::new();
            g = g.add(Text::new(lane.name.as_str()).set("x", 10).set("y", y + 17.0));
            g = g.add(
                Rectangle::new()
                    .set("x", left)
                    .set("y", y)
                    .set("width", width)
                    .set("height", 24)
                    .set("fill", SpanKind::Idle.colour()),
            );
            for (spans, y0, h) in [(&lane.spans, y, 24.0), (&lane.comm, y + 25.0, 6.0)] {
                for s in spans {
                    let w = ((s.end - s.start) * scale).max(0.5);
                    let rect = Rectangle::new()
                        .set("x", left + s.start * scale)
                        .set("y", y0)
                        .set("width", w)
                        .set("height", h)
                        .set("fill", s.kind.colour())
                        .set("stroke", "white")
                        .set("stroke-width", 0.5)
                        .add(Title::new(format!(
                            "{} {}: {:.4} to {:.4} {unit}",
                            s.kind.name(),
                            s.label,
                            s.start,
                            s.end
                        )));
                    g = g.add(rect);
                    if h > 10.0 && w > 8.0 * s.label.len() as f64 {
                        g = g.add(
                            Text::new(s.label.as_str())
                                .set("x", left + s.start * scale + 3.0)
                                .set("y", y0 + 16.0)
                                .set("fill", "white")
                                .set("font-size", 11),
                        );
                    }
                }
            }
            doc = doc.add(g);
        }
        let axis_y = top + lane_h * self.lanes.len() as f64 + 8.0;
        doc = doc.add(
            Line::new()
                .set("x1", left)
                .set("y1", axis_y)
                .set("x2", left + width)
                .set("y2", axis_y)
                .set("stroke", "black"),
        );
        for k in 0..=4 {
            let x = left + width * k as f64 / 4.0;
            let t = self.total * k as f64 / 4.0;
            doc = doc.add(Text::new(format!("{t:.3} {unit}")).set("x", x - 20.0).set("y", axis_y + 16.0));
        }
        let mut lx = left;
        for kind in [
            SpanKind::Forward,
            SpanKind::Backward,
            SpanKind::Transfer,
            SpanKind::AllReduce,
            SpanKind::Optimizer,
            SpanKind::Idle,
        ] {
            doc = doc.add(
                Rectangle::new()
                    .set("x", lx)
                    .set("y", axis_y + 30.0)
                    .set("width", 12)
                    .set("height", 12)
                    .set("fill", kind.colour()),
            );
            doc = doc.add(Text::new(kind.name()).set("x", lx + 16.0).set("y", axis_y + 41.0));
            lx += 110.0;
        }
        doc = doc.add(
            Text::new(format!("idle (not forward or backward): {:.1}%", 100.0 * self.idle_fraction()))
                .set("x", 10)
                .set("y", axis_y + 41.0),
        );
        doc.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::schedule::ScheduleKind;

    #[test]
    fn planned_gpipe_idle_matches_the_bubble_formula() {
        for (p, m) in [(2, 2), (3, 4), (4, 8)] {
            let s = Schedule::build(ScheduleKind::GPipe, p, m, &vec![0; p]).unwrap();
            let t = Timeline::from_schedule(&s, &vec![1.0; p], &vec![2.0; p], &[]);
            let bubble = crate::parallel::schedule::bubble_fraction(p, m);
            assert!((t.idle_fraction() - bubble).abs() < 1e-9, "p={p} m={m}: {} vs {bubble}", t.idle_fraction());
            let svg = t.to_svg("plan", "units");
            assert!(svg.starts_with("<svg") && svg.contains("F0") && svg.contains("idle"), "{svg}");
        }
    }
}
