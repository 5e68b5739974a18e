"""``summary.md`` of a ``gpu_check.sh`` run: the targets answered in ONE table first, then the
stages (exit status, time, command) and every stage's own table.

Reads what the stages left in the work folder (``--work``): ``status.tsv`` (one line per
finished stage: name, exit status, seconds, note, command), ``<stage>.md`` (its stdout: the
table), and the JSON rows of ``epoch.json``, ``epoch_compiled.json`` and ``table1.json``, which
those scripts rewrite after every row, so a stage killed by its time limit still contributes
what it measured. Called by ``gpu_check.sh`` after every stage (the summary is always
current) and at its end; safe to call with any of the files missing.

    python benchmarks/summary.py --work <folder> --title "..." > summary.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _tables import epoch_table_from_json, md_table, table1_table, table1_totals  # noqa: E402

EPOCH_STAGES = ("epoch", "epoch_compiled")


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_status(work: Path) -> dict[str, dict]:
    out = {}
    path = work / "status.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 5:
                out[parts[0]] = {"rc": parts[1], "seconds": parts[2], "note": parts[3],
                                 "cmd": parts[4]}
    return out


def stage_note(name: str, status: dict) -> str:
    s = status.get(name)
    if s is None:
        return f"stage {name} did not run (yet)"
    if s["rc"] == "0":
        return f"stage {name}"
    return f"stage {name}: {s['note'] or 'exit ' + s['rc']}"


def gpu_verdict_applies(device: str) -> bool:
    return "H100" in device or "H200" in device


def targets_table(work: Path, status: dict) -> list[str]:
    rows = []
    ref_rows = []
    for stage in EPOCH_STAGES:
        data = load_json(work / f"{stage}.json")
        if data is None:
            continue
        meta = data["meta"]
        target = meta.get("target_run") and gpu_verdict_applies(meta["device"])
        ref = next((r for r in data["rows"] if r["row"] == "reference" and "error" not in r), None)
        for r in data["rows"]:
            where = f"{stage_note(stage, status)} ({meta['device']})"
            if "error" in r:
                rows.append([r.get("label", r["row"]), f"**error**: {r['error']}", "", "", where])
                continue
            per50k = r["train_s"] * 50000 / r["samples"]
            if r["row"] == "reference":
                ref_rows.append([f"{meta['pair']} KD, batch {meta['batch_size']}: {r['label']}",
                                 f"{per50k:.2f} s per 50k-image epoch "
                                 f"({r['train_s']:.2f} s measured)", "the 1.0x of the ratios", "",
                                 where])
                continue
            ratio = ref["train_s"] / r["train_s"] if ref is not None else None
            ratio_s = f"**{ratio:.2f}x** the reference" if ratio is not None else "no reference"
            need = f"< {meta['target_epoch_s']:g} s and >= {meta['target_ratio']:g}x"
            if target:
                met_t = per50k < meta["target_epoch_s"]
                met_r = ratio is not None and ratio >= meta["target_ratio"]
                verdict = ("**met**" if met_t and met_r else
                           f"not met ({'time ok' if met_t else 'time'}; {'ratio ok' if met_r else 'ratio'})")
                if "H200" in meta["device"]:
                    verdict += " (on an H200: H100 SXM compute, more memory bandwidth)"
            else:
                verdict = "n/a: not the target's setting (CUDA H100/H200, width 1, 50k images, batch 64)"
            notes = []
            if r.get("graphs_timed"):
                notes.append(f"{r['graphs_timed']} graphs compiled during the timed epoch")
            if r.get("cudagraph_skips"):
                notes.append(f"{r['cudagraph_skips']} graphs compiled without CUDA graphs")
            if r.get("dynamo_warnings"):
                notes.append(f"dynamo: {r['dynamo_warnings'][0][:100]}")
            what = f"{meta['pair']} KD, batch {meta['batch_size']}, one 50k-image epoch: {r['label']}"
            rows.append([what, f"**{per50k:.2f} s** per 50k-image epoch, {ratio_s}; "
                         f"warm-up/compile {r['warmup_s']:.0f} s" + (f" ({'; '.join(notes)})" if notes else ""),
                         need, verdict, where])
    t1 = load_json(work / "table1.json")
    if t1 is not None and t1.get("rows"):
        t = table1_totals(t1["rows"])
        meta = t1["meta"]
        unit = "GPU-hours" if not meta["device"].startswith("cpu") else "CPU-hours (this CPU)"
        done = len(t1["rows"])
        stand_in = meta["width_mult"] != 1.0 or meta["max_batch"] or meta["n"] != 50000
        what = (f"**{t['total_high_h']:,.1f} {unit}** (students {t['students_h']:,.1f}, teachers "
                f"{t['teachers_high_h']:,.1f} at the margin gate's all-pass bound; "
                f"{t['total_low_h']:,.1f} with the gate closed as at initialisation), "
                f"{meta['runs']['students']} student + {meta['runs']['teachers']} teacher runs")
        if done < meta["rows_planned"] or t["failed_rows"]:
            what += (f"; PARTIAL: {done - t['failed_rows']} of {meta['rows_planned']} "
                     f"measurements, the rest left out")
        verdict = "stand-in sizes: not the paper's cost" if stand_in else "measured (no target)"
        rows.append(["Table 1, CIFAR-100 column: every row's epoch measured (teachers: their "
                     "objective's real step), x the recipe's epochs x batches x runs", what, "–",
                     verdict, f"{stage_note('table1', status)} ({meta['device']})"])
    elif "table1" in status:
        rows.append(["Table 1, CIFAR-100 column", f"not measured ({stage_note('table1', status)})",
                     "–", "–", ""])
    rows += ref_rows
    if not rows:
        return ["(no target measured yet)"]
    return [md_table(["target", "measured", "required", "verdict", "from"], rows, right=set())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--title", default="kdbench gpu_check")
    ap.add_argument("--stages", default="", help="comma-separated stage names, in order")
    ap.add_argument("--footer", default="")
    args = ap.parse_args(argv)
    work = Path(args.work)
    status = read_status(work)
    out = [f"# {args.title}", "", "## Targets", ""]
    try:
        out += targets_table(work, status)
    except Exception as exc:  # the summary must never lose the stage tables below
        out.append(f"(targets table failed: {type(exc).__name__}: {exc})")
    out += ["", "## Stages", "", "| stage | exit | seconds | note | command |",
            "|---|---:|---:|---|---|"]
    names = [s for s in args.stages.split(",") if s] or list(status)
    for name in names:
        s = status.get(name)
        if s is None:
            out.append(f"| {name} | – | – | not run (yet) | |")
        else:
            out.append(f"| {name} | {s['rc']} | {s['seconds']} | {s['note']} | `{s['cmd']}` |")
    if args.footer:
        out += ["", args.footer]
    for name in names:
        md = work / f"{name}.md"
        text = md.read_text().strip() if md.exists() else ""
        out += ["", f"## {name}", ""]
        if text:
            out.append(text)
        else:
            s = status.get(name)
            out.append("(no table: " + (stage_note(name, status) if s else "not run") + ")")
            data = load_json(work / f"{name}.json")
            if data is not None and name in EPOCH_STAGES and data.get("rows"):
                out += ["", "Rows measured before it stopped:", ""]
                out.append(epoch_table_from_json(data))
            elif data is not None and name == "table1" and data.get("rows"):
                out += ["", "Rows measured before it stopped:", ""]
                out.append(table1_table(data["rows"], data["meta"]))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
