"""The benchmarks' markdown tables that ``summary.py`` also renders (from the scripts' JSON):
pure Python, no torch, so the summary is quick to write after every stage of gpu_check.sh."""
from __future__ import annotations

from pathlib import Path

TARGET_EPOCH_S = 1.5  # one 50k-image WRN-40-2 -> WRN-16-2 KD epoch at batch 64 on an H100
TARGET_RATIO = 5.0  # x the reference loop, same run


def md_table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A markdown table; columns whose index is in ``right`` are right-aligned (default: all
    but the first two)."""
    right = set(range(2, len(headers))) if right is None else right
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def epoch_table(results, meta) -> str:
    """The markdown table of ``results`` (rows with their "label") and the run's ``meta``."""
    ref = next((r for r in results if r["row"] == "reference" and "error" not in r), None)
    fps = meta.get("flops_per_sample")
    rows = []
    for r in results:
        label = r["label"]
        if "error" in r:
            rows.append([label, *["–"] * 9, f"**error**: {r['error']}"])
            continue
        per50k = r["train_s"] * 50000 / r["samples"]
        ratio = ref["train_s"] / r["train_s"] if ref is not None else None
        tflops = (fps or 0) * r["samples"] / r["train_s"] / 1e12
        notes = [f"{r['precision']}, {r['layout']}"]
        if r["row"] != "reference":
            notes.append("teacher cast once" if r["teacher_cast_once"] else "teacher not cast")
        if r["row"] in ("compiled", "reduce-overhead"):
            notes.append(f"{r['graphs_warmup']} graphs compiled in warm-up, {r['graphs_timed']} "
                         "in the timed epoch")
        if r.get("cudagraph_skips"):
            notes.append(f"**{r['cudagraph_skips']} graphs without CUDA graphs** (cudagraph_skips)")
        if r.get("dynamo_warnings"):
            notes.append(f"dynamo: {r['dynamo_warnings'][0]}")
        verdict = ""
        if r["row"] != "reference":
            if meta["target_run"]:
                met = per50k < TARGET_EPOCH_S and ratio is not None and ratio >= TARGET_RATIO
                verdict = "**met**" if met else "not met"
            else:
                verdict = "n/a (not the target's setting)"
        rows.append([label, r["steps"], f"{r['train_s']:.2f}", f"{per50k:.2f}",
                     "–" if r["eval_s"] is None else f"{r['eval_s']:.2f}", f"{r['warmup_s']:.1f}",
                     f"{r['samples'] / r['train_s']:,.0f}",
                     "1.00x" if r["row"] == "reference" else
                     (f"**{ratio:.2f}x**" if ratio is not None else "–"),
                     f"{tflops:.3g}" if tflops else "–", verdict, "; ".join(notes)])
    headers = ["row", "steps", "train s", "s per 50k images", "eval s", "warm-up s", "images/s",
               "x reference", "achieved TFLOP/s",
               f"target (< {TARGET_EPOCH_S} s and >= {TARGET_RATIO:g}x)", "notes"]
    return md_table(headers, rows, right={1, 2, 3, 4, 5, 6, 7, 8})


def epoch_table_from_json(data: dict) -> str:
    return epoch_table(data["rows"], data["meta"])


def table1_totals(rows) -> dict:
    """GPU-hours of the grid: upper bound (margin teachers all pass) and lower (as measured)."""
    ok = [r for r in rows if "error" not in r]
    upper = {r["key"]: r for r in ok if r["upper_bound"]}
    students = sum(r["row_h"] for r in ok if r["kind"] == "student" and not r["upper_bound"])
    t_low = sum(r["row_h"] for r in ok if r["kind"] == "teacher" and not r["upper_bound"])
    t_high = sum((upper.get(r["key"], r))["row_h"] for r in ok
                 if r["kind"] == "teacher" and not r["upper_bound"])
    return {"students_h": students, "teachers_low_h": t_low, "teachers_high_h": t_high,
            "total_high_h": students + t_high, "total_low_h": students + t_low,
            "measured_rows": len([r for r in ok if not r["upper_bound"]]),
            "failed_rows": len([r for r in rows if "error" in r])}


def table1_table(rows, meta) -> str:
    out = []
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["pair"], r["row"], r["runs_of_row"], "–", "–", "–", "–", "–",
                         f"**error**: {r['error']}"])
            continue
        body.append([r["pair"], r["row"], r["runs"] if not r["upper_bound"] else f"({r['runs_of_row']})",
                     r["bs"], r["steps"], f"{1e3 * r['step_s']:.2f}", f"{r['eval_s']:.2f}",
                     f"{r['epoch_s']:.1f}", f"{r['row_h']:.2f}"
                     + ("" if r["finite"] else " (loss not finite)")
                     + (f" (+ init stage of {', '.join(r['init_stages_not_counted'])}, not counted)"
                        if r.get("init_stages_not_counted") else "")])
    t = table1_totals(rows)
    stand_in = meta["width_mult"] != 1.0 or meta["max_batch"] or meta["n"] != 50000
    unit = "GPU-hours" if meta["device"] not in ("cpu",) and not meta["device"].startswith("cpu") \
        else "CPU-hours (this CPU)"
    out.append(f"\n*Table 1 (CIFAR-100 column) of {Path(meta['recipe']).name}: every row measured "
               f"as the engine trains it on {meta['device']} (precision {meta['precision']}, "
               f"compile {meta['compile']}), {meta['n']} train / {meta['n_test']} test synthetic "
               f"images of CIFAR-100's shape; epoch = batches x measured step + one evaluation. "
               f"{meta['machine']}.*\n")
    out.append(md_table(["pair", "row", "runs", "batch", "steps timed", "ms/step", "eval s",
                           "s/epoch", unit], body, right={2, 3, 4, 5, 6, 7, 8}))
    planned = meta["rows_planned"]
    done = len(rows)
    out.append("")
    out.append(f"**Table 1, CIFAR-100 column: {t['total_high_h']:,.1f} {unit}** "
               f"(students {t['students_h']:,.1f}, teachers {t['teachers_high_h']:,.1f} with the "
               f"margin teachers' all-pass upper bound; {t['total_low_h']:,.1f} with the margin "
               f"teachers as measured at initialisation, gate closed), for "
               f"{meta['runs']['students']} student and {meta['runs']['teachers']} teacher runs, one "
               f"at a time.")
    if done < planned or t["failed_rows"]:
        out.append(f"PARTIAL: {done - t['failed_rows']} of {planned} measurements done "
                   f"({t['failed_rows']} failed): the total leaves the missing rows out.")
    if stand_in:
        out.append("Stand-in sizes (width, batch or data changed): this does not describe the "
                   "paper's cost.")
    return "\n".join(out)
