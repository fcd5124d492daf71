#!/usr/bin/env python3
"""Turns a bench run into the results table: criterion's estimates (target/criterion) and the
peers' JSON lines (bench/peers/*.py) become one markdown file of throughputs and ratios
(tessera / peer, above 1 = tessera faster), with the machine, driver, date and commit.

    python3 bench/results.py --criterion target/criterion --peers peers.jsonl --out bench/results/DATE-cpu.md
"""
import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
from collections import defaultdict


def units(group, kind):
    if group.startswith("gemm"):
        return "GFLOP/s", 1e9
    if group.startswith("train"):
        return "samples/s", 1.0
    return "GB/s", 1e9


def load_criterion(root):
    rows = []
    for bj in glob.glob(os.path.join(root, "**", "new", "benchmark.json"), recursive=True):
        est = os.path.join(os.path.dirname(bj), "estimates.json")
        if not os.path.exists(est):
            continue
        b = json.load(open(bj))
        e = json.load(open(est))
        thr = b.get("throughput") or {}
        if not thr:
            continue
        kind, amount = next(iter(thr.items()))
        seconds = e["median"]["point_estimate"] * 1e-9
        rows.append({"group": b["group_id"], "function": b["function_id"], "rate": amount / seconds, "kind": kind})
    return rows


def machine():
    lines = []
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            lines.append("GPU: " + smi.stdout.strip().replace("\n", "; "))
    except (OSError, subprocess.TimeoutExpired):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                cpu = l.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines.append(f"CPU: {cpu}, {os.cpu_count()} cores")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--criterion", default="target/criterion")
    ap.add_argument("--peers", default=None, help="JSON lines from bench/peers/*.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="tessera benchmark results")
    ap.add_argument("--command", default="scripts/bench.sh")
    a = ap.parse_args()
    rows = load_criterion(a.criterion)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    out = [f"# {a.title}", "", f"- date: {datetime.date.today().isoformat()}, commit {commit}, command `{a.command}`"]
    out += [f"- {l}" for l in machine()]
    out += ["- ratio = tessera / peer throughput, both measured in the same run (above 1: tessera is faster)", ""]

    by_group = defaultdict(dict)
    for r in rows:
        by_group[r["group"]][r["function"]] = r
    for group in sorted(by_group):
        fns = by_group[group]
        unit, scale = units(group, None)
        out += [f"## {group}", "", f"| case | tessera ({unit}) | peer | peer ({unit}) | ratio |", "|---|---|---|---|---|"]
        # "tessera CASE", or "tessera-VARIANT CASE" (a kernel family), against "PEER CASE".
        ours = {}
        for fn in fns:
            head, _, case = fn.partition(" ")
            if head == "tessera" or head.startswith("tessera-"):
                ours[fn] = (head[len("tessera-"):] if head != "tessera" else "", case)
        cases = {case for _, case in ours.values()}
        for fn in sorted(ours, key=lambda f: (ours[f][1], ours[f][0])):
            variant, case = ours[fn]
            label = f"{case} [{variant}]" if variant else case
            t = fns[fn]["rate"] / scale
            peers = [(p.split(" ")[0], fns[p]["rate"] / scale) for p in fns if p not in ours and p.partition(" ")[2] == case]
            if peers:
                for name, pr in peers:
                    out.append(f"| {label} | {t:,.1f} | {name} | {pr:,.1f} | {t / pr:.2f} |")
            else:
                out.append(f"| {label} | {t:,.1f} | | | |")
        # Groups without the tessera/peer naming (all-reduce, plans, train steps). In an
        # all-reduce group the copy of the same buffer is every row's peer.
        copy = next((f for f in fns if group.startswith("allreduce/") and f.startswith("copy ")), None)
        for fn in sorted(fns):
            if fn in ours or fn.partition(" ")[2] in cases or fn == copy:
                continue
            t = fns[fn]["rate"] / scale
            if copy:
                c = fns[copy]["rate"] / scale
                out.append(f"| {fn} | {t:,.1f} | copy | {c:,.1f} | {t / c:.2f} |")
            else:
                out.append(f"| {fn} | {t:,.1f} | | | |")
        out.append("")

    if a.peers and os.path.exists(a.peers):
        peers = [json.loads(l) for l in open(a.peers) if l.strip().startswith("{")]
        steps = [p for p in peers if p["bench"] == "train_step"]
        if steps:
            out += ["## training step vs peers (samples/s)", "", "| model, batch | device | tessera | peer | peer samples/s | ratio |", "|---|---|---|---|---|---|"]
            for p in steps:
                dev = "cuda" if p["device"].startswith("cuda") else "cpu"
                fn = f"{p['widths']} batch {p['batch']}"
                t = by_group.get(f"train_step/{dev}", {}).get(fn)
                tr = f"{t['rate']:,.0f}" if t else "not run"
                ratio = f"{t['rate'] / p['samples_per_s']:.2f}" if t else ""
                out.append(f"| {fn} | {p['device']} | {tr} | {p['peer']} | {p['samples_per_s']:,.0f} | {ratio} |")
            out.append("")
        gpt = [p for p in peers if p["bench"] == "gpt_step"]
        if gpt:
            out += ["## GPT training step vs peers (steps/s)", "", "| model, batch | tessera | peer | peer steps/s | ratio |", "|---|---|---|---|---|"]
            for p in gpt:
                fn = f"gpt {p['layers']}x{p['width']} heads {p['heads']} context {p['context']} batch {p['batch']}"
                t = by_group.get("gpt_step/cpu", {}).get(fn)
                tr = f"{t['rate']:,.2f}" if t else "not run"
                ratio = f"{t['rate'] / p['steps_per_s']:.2f}" if t else ""
                out.append(f"| {fn} | {tr} | {p['peer']} | {p['steps_per_s']:,.2f} | {ratio} |")
            out.append("")
        ops = [p for p in peers if p["bench"] == "transformer"]
        if ops:
            out += ["## transformer kernels vs peers (GB/s, the same bytes counted)", "", "| case | device | tessera | peer | peer | ratio |", "|---|---|---|---|---|---|"]
            for p in ops:
                dev = "cuda" if p.get("device", "cpu").startswith("cuda") else "cpu"
                t = by_group.get(f"transformer/{dev}", {}).get(f"tessera {p['case']}")
                tr = t["rate"] / 1e9 if t else None
                pr = p["bytes_per_s"] / 1e9
                out.append(f"| {p['case']} | {dev} | {tr:,.2f} | {p['peer']} | {pr:,.2f} | {tr / pr:.2f} |" if tr else f"| {p['case']} | {dev} | not run | {p['peer']} | {pr:,.2f} | |")
            out.append("")
        gemms = [p for p in peers if p["bench"] == "gemm"]
        if gemms:
            out += ["## CPU GEMM vs numpy (GFLOP/s)", "", f"BLAS: {gemms[0].get('blas', '')}", "", "| shape | tessera | numpy | ratio |", "|---|---|---|---|"]
            for p in gemms:
                t = by_group.get("gemm/cpu", {}).get(f"tessera {p['shape']}")
                tr = t["rate"] / 1e9 if t else None
                out.append(f"| {p['shape']} | {tr:,.1f} | {p['flops_per_s'] / 1e9:,.1f} | {tr * 1e9 / p['flops_per_s']:.2f} |" if tr else f"| {p['shape']} | not run | {p['flops_per_s'] / 1e9:,.1f} | |")
            out.append("")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    open(a.out, "w").write("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
