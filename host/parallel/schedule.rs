//! Pipeline schedules as data: for each stage, the list of actions it performs in one step
//! (forward or backward of a microbatch, sends and receives of activations and gradients,
//! all-reduce of a gradient bucket, the optimizer step). A checker proves a schedule sound
//! before it runs: every send has its receive, no stage waits forever, every microbatch goes
//! forward before backward on every stage; it also counts the activations in flight.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// GPipe: all forwards (fill), then all backwards (drain). Keeps every microbatch's
    /// activations until its backward.
    GPipe,
    /// One-forward-one-backward: after a warm-up of `stages - 1 - s` forwards, stage `s`
    /// alternates; at most `stages - s` microbatches are in flight on it.
    OneFOneB,
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
        })
    }
}

impl FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gpipe" | "fill-drain" => Ok(ScheduleKind::GPipe),
            "1f1b" | "one-f-one-b" => Ok(ScheduleKind::OneFOneB),
            _ => Err(Error::Invalid(format!("unknown pipeline schedule `{s}`: use gpipe or 1f1b"))),
        }
    }
}

/// One thing a stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Forward of a microbatch.
    Forward(usize),
    /// Backward of a microbatch.
    Backward(usize),
    /// Send a microbatch's output activation to the next stage.
    SendAct(usize),
    /// Receive a microbatch's input activation from the previous stage.
    RecvAct(usize),
    /// Send a microbatch's input gradient to the previous stage.
    SendGrad(usize),
    /// Receive a microbatch's output gradient from the next stage.
    RecvGrad(usize),
    /// All-reduce a gradient bucket (a layer of the stage) across the data-parallel replicas.
    AllReduce(usize),
    /// The optimizer step.
    OptimizerStep,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward(m) => write!(f, "F{m}"),
            Action::Backward(m) => write!(f, "B{m}"),
            Action::SendAct(m) => write!(f, "send-act {m}"),
            Action::RecvAct(m) => write!(f, "recv-act {m}"),
            Action::SendGrad(m) => write!(f, "send-grad {m}"),
            Action::RecvGrad(m) => write!(f, "recv-grad {m}"),
            Action::AllReduce(b) => write!(f, "all-reduce bucket {b}"),
            Action::OptimizerStep => write!(f, "optimizer step"),
        }
    }
}

/// A schedule: the actions of every stage for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Which kind built it (or the kind it claims to be).
    pub kind: ScheduleKind,
    /// Microbatches per step.
    pub microbatches: usize,
    /// `actions[s]`: stage `s`'s actions, in order.
    pub actions: Vec<Vec<Action>>,
}

/// What the checker found out about a sound schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleStats {
    /// Most microbatches whose activations a stage holds at once, per stage.
    pub peak_in_flight: Vec<usize>,
}

impl Schedule {
    /// Builds `kind` for `stages` stages and `microbatches` microbatches; `buckets[s]` is the
    /// number of gradient buckets of stage `s` (0: no data parallelism, no all-reduce). Any
    /// counts work, microbatches fewer than stages included.
    pub fn build(kind: ScheduleKind, stages: usize, microbatches: usize, buckets: &[usize]) -> Result<Self> {
        if stages == 0 || microbatches == 0 {
            return Err(Error::Invalid(format!(
                "a schedule needs stages >= 1 and microbatches >= 1 (got {stages}, {microbatches})"
            )));
        }
        if buckets.len() != stages {
            return Err(Error::Invalid(format!("{} bucket counts for {stages} stages", buckets.len())));
        }
        let (p, m) = (stages, microbatches);
        let mut actions = Vec::with_capacity(p);
        for (s, &nb) in buckets.iter().enumerate() {
            let mut v = Vec::new();
            let fwd = |v: &mut Vec<Action>, mb| {
                if s > 0 {
                    v.push(Action::RecvAct(mb));
                }
                v.push(Action::Forward(mb));
                if s + 1 < p {
                    v.push(Action::SendAct(mb));
                }
            };
            let bwd = |v: &mut Vec<Action>, mb| {
                if s + 1 < p {
                    v.push(Action::RecvGrad(mb));
                }
                v.push(Action::Backward(mb));
                if s > 0 {
                    v.push(Action::SendGrad(mb));
                }
            };
            match kind {
                ScheduleKind::GPipe => {
                    (0..m).for_each(|mb| fwd(&mut v, mb));
                    (0..m).for_each(|mb| bwd(&mut v, mb));
                }
                ScheduleKind::OneFOneB => {
                    let warmup = (p - 1 - s).min(m);
                    (0..warmup).for_each(|mb| fwd(&mut v, mb));
                    for i in 0..m - warmup {
                        fwd(&mut v, warmup + i);
                        bwd(&mut v, i);
                    }
                    (m - warmup..m).for_each(|mb| bwd(&mut v, mb));
                }
            }
            // Buckets are the stage's layers, last layer first: the order backward finishes them.
            (0..nb).rev().for_each(|b| v.push(Action::AllReduce(b)));
            v.push(Action::OptimizerStep);
            actions.push(v);
        }
        Ok(Schedule { kind, microbatches: m, actions })
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.actions.len()
    }

    /// Proves the schedule sound, or says which stage and action break it.
    pub fn check(&self) -> Result<ScheduleStats> {
        let p = self.stages();
        let m = self.microbatches;
        let bad = |stage: usize, i: usize, action: Action, reason: String| Error::Schedule {
            stage,
            index: i,
            action: action.to_string(),
            reason,
        };
        // Static checks: each stage does every microbatch's forward and backward exactly once.
        for (s, acts) in self.actions.iter().enumerate() {
            let mut seen = HashSet::new();
            for (i, a) in acts.iter().enumerate() {
                if let Action::Forward(mb)
                | Action::Backward(mb)
                | Action::SendAct(mb)
                | Action::RecvAct(mb)
                | Action::SendGrad(mb)
                | Action::RecvGrad(mb) = *a
                {
                    if mb >= m {
                        return Err(bad(s, i, *a, format!("microbatch {mb} does not exist (there are {m})")));
                    }
                }
                match a {
                    Action::SendAct(_) | Action::RecvGrad(_) if s + 1 == p => {
                        return Err(bad(s, i, *a, "the last stage has no next stage".into()));
                    }
                    Action::RecvAct(_) | Action::SendGrad(_) if s == 0 => {
                        return Err(bad(s, i, *a, "the first stage has no previous stage".into()));
                    }
                    _ => {}
                }
                if !seen.insert(*a) {
                    return Err(bad(s, i, *a, "appears twice".into()));
                }
            }
            for mb in 0..m {
                for a in [Action::Forward(mb), Action::Backward(mb)] {
                    if !seen.contains(&a) {
                        return Err(bad(s, acts.len(), a, format!("stage {s} never runs {a}")));
                    }
                }
            }
        }
        // Dynamic check: run the stages with buffered sends and blocking receives.
        let mut pc = vec![0usize; p];
        let mut act_q: Vec<VecDeque<usize>> = vec![VecDeque::new(); p]; // into stage s
        let mut grad_q: Vec<VecDeque<usize>> = vec![VecDeque::new(); p]; // into stage s
        let mut have_act: Vec<HashSet<usize>> = vec![HashSet::new(); p];
        let mut have_grad: Vec<HashSet<usize>> = vec![HashSet::new(); p];
        let mut fwd: Vec<HashSet<usize>> = vec![HashSet::new(); p];
        let mut bwd: Vec<HashSet<usize>> = vec![HashSet::new(); p];
        let mut in_flight = vec![0usize; p];
        let mut peak = vec![0usize; p];
        loop {
            let mut progress = false;
            for s in 0..p {
                while pc[s] < self.actions[s].len() {
                    let i = pc[s];
                    let a = self.actions[s][i];
                    let ready = match a {
                        Action::RecvAct(mb) => match act_q[s].front() {
                            Some(&f) if f == mb => {
                                act_q[s].pop_front();
                                have_act[s].insert(mb);
                                true
                            }
                            Some(&f) => {
                                return Err(bad(
                                    s,
                                    i,
                                    a,
                                    format!("stage {} sent microbatch {f}'s activation first", s - 1),
                                ))
                            }
                            None => false,
                        },
                        Action::RecvGrad(mb) => match grad_q[s].front() {
                            Some(&f) if f == mb => {
                                grad_q[s].pop_front();
                                have_grad[s].insert(mb);
                                true
                            }
                            Some(&f) => {
                                return Err(bad(
                                    s,
                                    i,
                                    a,
                                    format!("stage {} sent microbatch {f}'s gradient first", s + 1),
                                ))
                            }
                            None => false,
                        },
                        Action::Forward(mb) => {
                            if s > 0 && !have_act[s].contains(&mb) {
                                return Err(bad(
                                    s,
                                    i,
                                    a,
                                    format!("forward before its input was received (no earlier recv-act {mb})"),
                                ));
                            }
                            fwd[s].insert(mb);
                            in_flight[s] += 1;
                            peak[s] = peak[s].max(in_flight[s]);
                            true
                        }
                        Action::Backward(mb) => {
                            if !fwd[s].contains(&mb) {
                                return Err(bad(s, i, a, format!("backward before forward of microbatch {mb}")));
                            }
                            if s + 1 < p && !have_grad[s].contains(&mb) {
                                return Err(bad(
                                    s,
                                    i,
                                    a,
                                    format!(
                                        "backward before its output gradient was received (no earlier recv-grad {mb})"
                                    ),
                                ));
                            }
                            bwd[s].insert(mb);
                            in_flight[s] -= 1;
                            true
                        }
                        Action::SendAct(mb) => {
                            if !fwd[s].contains(&mb) {
                                return Err(bad(
                                    s,
                                    i,
                                    a,
                                    format!("sends microbatch {mb}'s activation before computing it"),
                                ));
                            }
                            act_q[s + 1].push_back(mb);
                            true
                        }
                        Action::SendGrad(mb) => {
                            if !bwd[s].contains(&mb) {
                                return Err(bad(
                                    s,
                                    i,
                                    a,
                                    format!("sends microbatch {mb}'s gradient before its backward"),
                                ));
                            }
                            grad_q[s - 1].push_back(mb);
                            true
                        }
                        Action::AllReduce(_) | Action::OptimizerStep => {
                            if bwd[s].len() < m {
                                return Err(bad(s, i, a, format!("comes before all {m} backwards of the stage")));
                            }
                            true
                        }
                    };
                    if !ready {
                        break;
                    }
                    pc[s] += 1;
                    progress = true;
                }
            }
            if (0..p).all(|s| pc[s] == self.actions[s].len()) {
                break;
            }
            if !progress {
                let s = (0..p).find(|&s| pc[s] < self.actions[s].len()).unwrap();
                let blocked: Vec<String> = (0..p)
                    .filter(|&t| pc[t] < self.actions[t].len())
                    .map(|t| format!("stage {t} at {}", self.actions[t][pc[t]]))
                    .collect();
                return Err(bad(
                    s,
                    pc[s],
                    self.actions[s][pc[s]],
                    format!("waits forever: a deadlock ({}), no stage can move", blocked.join(", ")),
                ));
            }
        }
        for s in 0..p {
            if let Some(mb) = act_q[s].front() {
                return Err(bad(
                    s - 1,
                    self.actions[s - 1].len(),
                    Action::SendAct(*mb),
                    format!("stage {s} never receives it"),
                ));
            }
            if let Some(mb) = grad_q[s].front() {
                return Err(bad(
                    s + 1,
                    self.actions[s + 1].len(),
                    Action::SendGrad(*mb),
                    format!("stage {s} never receives it"),
                ));
            }
        }
        Ok(ScheduleStats { peak_in_flight: peak })
    }

    /// Proves that the schedule stays sound when each stage is spread over `tp` tensor-parallel
    /// ranks that all run it, and whose forwards and backwards on the stages marked in `sums`
    /// sum over the stage's ranks inside: see [`Schedule::check_ranks`].
    pub fn check_tp(&self, tp: usize, sums: &[bool]) -> Result<ScheduleStats> {
        Self::check_ranks(&vec![self.clone(); tp.max(1)], sums)
    }

    /// Proves sound a mesh of tensor-parallel ranks, rank `k` running `ranks[k]` (one schedule
    /// each, of the same stages and microbatches): each rank's schedule is sound alone
    /// ([`Schedule::check`]); rank `k` of a stage hands activations and gradients to rank `k`
    /// of its neighbours; and a forward or backward of a stage marked in `sums` is a collective
    /// of the stage's ranks (the sums inside its layers), which completes only when every rank
    /// of the stage has reached it. Every rank must issue the same collectives in the same
    /// order, and no cycle of waits may run through the pipeline and the tensor-parallel groups:
    /// otherwise an error names the stage, the ranks and what each waits for.
    pub fn check_ranks(ranks: &[Schedule], sums: &[bool]) -> Result<ScheduleStats> {
        let Some(first) = ranks.first() else {
            return Err(Error::Invalid("no tensor-parallel ranks to check".into()));
        };
        let p = first.stages();
        let mut stats = first.check()?;
        for (k, r) in ranks.iter().enumerate().skip(1) {
            if r.stages() != p || r.microbatches != first.microbatches {
                return Err(Error::Invalid(format!(
                    "tensor-parallel rank {k}'s schedule has {} stages and {} microbatches, rank 0's {p} and {}",
                    r.stages(),
                    r.microbatches,
                    first.microbatches
                )));
            }
            let st = r.check()?;
            for (a, b) in stats.peak_in_flight.iter_mut().zip(st.peak_in_flight) {
                *a = (*a).max(b);
            }
        }
        if sums.len() != p {
            return Err(Error::Invalid(format!("{} stages marked for sums, the schedule has {p}", sums.len())));
        }
        let tp = ranks.len();
        let collective = |a: Action, s: usize| sums[s] && matches!(a, Action::Forward(_) | Action::Backward(_));
        let bad = |stage: usize, i: usize, action: Action, reason: String| Error::Schedule {
            stage,
            index: i,
            action: action.to_string(),
            reason,
        };
        // Each rank's chain of stages with buffered sends and blocking receives (each alone is
        // sound: only the waits between them are left to check), the stages' collectives as
        // barriers of their ranks.
        let mut pc = vec![vec![0usize; p]; tp];
        let mut act_q: Vec<Vec<VecDeque<usize>>> = vec![vec![VecDeque::new(); p]; tp];
        let mut grad_q: Vec<Vec<VecDeque<usize>>> = vec![vec![VecDeque::new(); p]; tp];
        let at = |pc: &Vec<Vec<usize>>, k: usize, s: usize| ranks[k].actions[s].get(pc[k][s]).copied();
        loop {
            let mut progress = false;
            for k in 0..tp {
                for s in 0..p {
                    while let Some(a) = at(&pc, k, s) {
                        let ready = match a {
                            Action::RecvAct(mb) => act_q[k][s].front() == Some(&mb),
                            Action::RecvGrad(mb) => grad_q[k][s].front() == Some(&mb),
                            _ => true,
                        };
                        if !ready || collective(a, s) {
                            break;
                        }
                        match a {
                            Action::RecvAct(_) => {
                                act_q[k][s].pop_front();
                            }
                            Action::RecvGrad(_) => {
                                grad_q[k][s].pop_front();
                            }
                            Action::SendAct(mb) => act_q[k][s + 1].push_back(mb),
                            Action::SendGrad(mb) => grad_q[k][s - 1].push_back(mb),
                            _ => {}
                        }
                        pc[k][s] += 1;
                        progress = true;
                    }
                }
            }
            // A stage's collective completes when all its ranks stand at it; ranks standing at
            // different collectives disagree.
            for s in 0..p {
                let here: Vec<Option<Action>> = (0..tp).map(|k| at(&pc, k, s)).collect();
                if here.iter().all(|a| a.is_some_and(|a| collective(a, s))) {
                    let a0 = here[0].unwrap();
                    if let Some(k) = (1..tp).find(|&k| here[k] != Some(a0)) {
                        return Err(bad(
                            s,
                            pc[k][s],
                            here[k].unwrap(),
                            format!(
                                "tensor-parallel rank {k} makes this action's sums while rank 0 makes {a0}'s: every rank of a stage must issue the same collectives in the same order"
                            ),
                        ));
                    }
                    for row in pc.iter_mut() {
                        row[s] += 1;
                    }
                    progress = true;
                }
            }
            if (0..tp).all(|k| (0..p).all(|s| at(&pc, k, s).is_none())) {
                return Ok(stats);
            }
            if !progress {
                let blocked: Vec<String> = (0..tp)
                    .flat_map(|k| (0..p).map(move |s| (k, s)))
                    .filter_map(|(k, s)| {
                        at(&pc, k, s).map(|a| {
                            let why = if collective(a, s) { "its sums" } else { "a message" };
                            format!("stage {s} rank {k} at {a} ({why})")
                        })
                    })
                    .collect();
                let (k, s) =
                    (0..tp).flat_map(|k| (0..p).map(move |s| (k, s))).find(|&(k, s)| at(&pc, k, s).is_some()).unwrap();
                return Err(bad(
                    s,
                    pc[k][s],
                    at(&pc, k, s).unwrap(),
                    format!(
                        "waits forever: a cycle of waits through the pipeline and the tensor-parallel groups ({})",
                        blocked.join(", ")
                    ),
                ));
            }
        }
    }

    /// Simulated timing with a forward taking `fwd[s]` and a backward `bwd[s]` time units on
    /// stage `s` (transfers free): per stage, the spans `(start, end, action)` of its
    /// forwards and backwards, and the makespan. The schedule must be sound.
    pub fn simulate(&self, fwd: &[f64], bwd: &[f64]) -> (Vec<Vec<Timed>>, f64) {
        let p = self.stages();
        let mut t = vec![0f64; p];
        let mut pc = vec![0usize; p];
        let mut act_ready: Vec<Vec<Option<f64>>> = vec![vec![None; self.microbatches]; p];
        let mut grad_ready: Vec<Vec<Option<f64>>> = vec![vec![None; self.microbatches]; p];
        let mut spans = vec![Vec::new(); p];
        loop {
            let mut progress = false;
            for s in 0..p {
                while pc[s] < self.actions[s].len() {
                    let a = self.actions[s][pc[s]];
                    match a {
                        Action::RecvAct(mb) => match act_ready[s][mb] {
                            Some(r) => t[s] = t[s].max(r),
                            None => break,
                        },
                        Action::RecvGrad(mb) => match grad_ready[s][mb] {
                            Some(r) => t[s] = t[s].max(r),
                            None => break,
                        },
                        Action::Forward(_) => {
                            spans[s].push((t[s], t[s] + fwd[s], a));
                            t[s] += fwd[s];
                        }
                        Action::Backward(_) => {
                            spans[s].push((t[s], t[s] + bwd[s], a));
                            t[s] += bwd[s];
                        }
                        Action::SendAct(mb) => act_ready[s + 1][mb] = Some(t[s]),
                        Action::SendGrad(mb) => grad_ready[s - 1][mb] = Some(t[s]),
                        Action::AllReduce(_) | Action::OptimizerStep => {}
                    }
                    pc[s] += 1;
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        let end = t.iter().cloned().fold(0.0, f64::max);
        (spans, end)
    }

    /// The schedule as a time-by-stage chart (unit forwards, double backwards), one row per
    /// stage: `F3` a forward of microbatch 3, `B3` its backward, `.` idle.
    pub fn chart(&self) -> String {
        let p = self.stages();
        let (spans, end) = self.simulate(&vec![1.0; p], &vec![2.0; p]);
        let cols = end as usize;
        let w = format!("{}", self.microbatches.saturating_sub(1)).len() + 1;
        let mut out = String::new();
        for (s, sp) in spans.iter().enumerate() {
            let mut row = vec![".".repeat(w); cols];
            for (a, b, act) in sp {
                let label = match act {
                    Action::Forward(m) => format!("F{m:<width$}", width = w - 1),
                    Action::Backward(m) => format!("B{m:<width$}", width = w - 1),
                    _ => continue,
                };
                for cell in &mut row[(*a as usize)..(*b as usize)] {
                    cell.clone_from(&label);
                }
            }
            out.push_str(&format!("stage {s}: {}\n", row.join(" ")));
        }
        out
    }
}

/// An action with its simulated start and end.
pub type Timed = (f64, f64, Action);

/// The idle fraction GPipe's fill and drain leave: `(p - 1) / (m + p - 1)`.
pub fn bubble_fraction(stages: usize, microbatches: usize) -> f64 {
    (stages.saturating_sub(1)) as f64 / (microbatches + stages.saturating_sub(1)).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_schedules_are_sound_for_awkward_counts() {
        for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
            for p in 1..=5 {
                for m in 1..=7 {
                    let s = Schedule::build(kind, p, m, &vec![2; p]).unwrap();
                    let st = s.check().unwrap_or_else(|e| panic!("{kind} p={p} m={m}: {e}"));
                    match kind {
                        ScheduleKind::GPipe => assert!(st.peak_in_flight.iter().all(|&x| x == m)),
                        ScheduleKind::OneFOneB => {
                            for (st_, &peak) in st.peak_in_flight.iter().enumerate() {
                                assert_eq!(peak, (p - st_).min(m), "{kind} p={p} m={m} stage {st_}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn broken_schedules_are_rejected_with_stage_and_action() {
        let mut s = Schedule::build(ScheduleKind::OneFOneB, 3, 4, &[0; 3]).unwrap();
        // Stage 1 waits for microbatch 1's gradient before it has sent microbatch 1 forward.
        let i = s.actions[1].iter().position(|a| *a == Action::SendAct(1)).unwrap();
        let j = s.actions[1].iter().position(|a| *a == Action::RecvGrad(1)).unwrap();
        s.actions[1].swap(i, j);
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("stage 1") && e.contains("recv-grad 1"), "{e}");

        // Stage 0 waits for a gradient before sending the activation that would produce it.
        let mut s = Schedule::build(ScheduleKind::GPipe, 2, 2, &[0; 2]).unwrap();
        let i = s.actions[0].iter().position(|a| *a == Action::SendAct(0)).unwrap();
        s.actions[0].remove(i);
        let j = s.actions[0].iter().position(|a| *a == Action::Backward(0)).unwrap();
        s.actions[0].insert(j, Action::SendAct(0));
        let k = s.actions[0].iter().position(|a| *a == Action::Forward(1)).unwrap();
        s.actions[0].insert(k, Action::RecvGrad(0));
        let r = s.actions[0].iter().rposition(|a| *a == Action::RecvGrad(0)).unwrap();
        s.actions[0].remove(r);
        let e = s.check().unwrap_err().to_string();
        assert!(
            e.contains("deadlock") && e.contains("stage 0 at recv-grad 0") && e.contains("stage 1 at recv-act 0"),
            "{e}"
        );

        let mut s = Schedule::build(ScheduleKind::GPipe, 2, 2, &[0; 2]).unwrap();
        s.actions[1].retain(|a| *a != Action::RecvAct(1));
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("stage 1") && e.contains("F1") && e.contains("no earlier recv-act 1"), "{e}");

        let mut s = Schedule::build(ScheduleKind::GPipe, 2, 2, &[0; 2]).unwrap();
        s.actions[0].retain(|a| *a != Action::Backward(1));
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("stage 0") && e.contains("never runs B1"), "{e}");

        let mut s = Schedule::build(ScheduleKind::GPipe, 2, 3, &[0; 2]).unwrap();
        let a = s.actions[1].iter().position(|a| *a == Action::RecvAct(0)).unwrap();
        let b = s.actions[1].iter().position(|a| *a == Action::RecvAct(1)).unwrap();
        s.actions[1].swap(a, b);
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("stage 1") && e.contains("sent microbatch 0's activation first"), "{e}");
    }

    /// Tensor-parallel ranks: the same schedule on every rank is sound; a rank whose stage
    /// issues its sums in another order is caught.
    #[test]
    fn tensor_parallel_ranks_are_checked() {
        for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
            let s = Schedule::build(kind, 3, 4, &[1; 3]).unwrap();
            assert!(s.check_tp(4, &[true, false, true]).is_ok());
        }
        // Rank 1 runs 1F1B where rank 0 runs GPipe: each is sound alone, but on stage 1 rank 0
        // makes forward 1's sums while rank 1 makes backward 0's.
        let gpipe = Schedule::build(ScheduleKind::GPipe, 2, 2, &[0; 2]).unwrap();
        let ofob = Schedule::build(ScheduleKind::OneFOneB, 2, 2, &[0; 2]).unwrap();
        let e = Schedule::check_ranks(&[gpipe.clone(), ofob.clone()], &[false, true]).unwrap_err().to_string();
        assert!(e.contains("same collectives in the same order") && e.contains("stage 1"), "{e}");
        // Without sums there is nothing to meet at: each rank's pipeline runs on its own.
        assert!(Schedule::check_ranks(&[gpipe, ofob], &[false, false]).is_ok());
    }

    #[test]
    fn chart_and_bubble() {
        let s = Schedule::build(ScheduleKind::GPipe, 2, 2, &[0; 2]).unwrap();
        let c = s.chart();
        assert_eq!(c, "stage 0: F0 F1 .. .. .. B0 B0 B1 B1\nstage 1: .. F0 F1 B0 B0 B1 B1 .. ..\n", "{c}");
        assert!((bubble_fraction(4, 4) - 3.0 / 7.0).abs() < 1e-12);
    }
}
