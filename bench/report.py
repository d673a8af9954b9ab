"""docs/performance.md from bench/results/*.json: the README's performance figures.

python -m bench.report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS

OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(m: dict[str, Any]) -> str:
    gpus = "".join(
        f", {g['name']} (driver {g['driver']}, {g['memory']})" for g in m.get("gpus", [])
    )
    return (
        f"{m['cpu']}, {m['cores']} cores{gpus}, onnxruntime {m['onnxruntime']} "
        f"({', '.join(m['providers'])}), measured {m['when']}"
    )


def _model_table(model: dict[str, Any]) -> list[str]:
    lines = [
        f"`{model['command']}` on {_machine(model['machine'])}.",
        "",
        "| model | runtime | batch | p50 ms | ms / image | images / s |",
        "|---|---|---|---|---|---|",
    ]
    for r in model["results"]:
        for row in r["rows"]:
            lines.append(
                f"| {r['model']} | {r['runtime']} ({r['provider']}) | {row['batch']} | "
                f"{row['p50_ms']:.1f} | {row['ms_per_image']:.1f} | {row['images_per_s']:.1f} |"
            )
    return [*lines, ""]


# The GPU machine's results, written by scripts/gpu-bench.sh.
GPU_HTTP_RUNS = [
    ("gpu_http_load_pwae", "P-WAE through HTTP on the GPU"),
    ("gpu_http_load_otproto", "OT prototypes through HTTP on the GPU"),
]


def _gpu_targets() -> list[str]:
    """The GPU targets, met or not, from the GPU machine's results."""
    rows = []
    for name, _ in GPU_HTTP_RUNS:
        http = _load(name)
        if not http:
            continue
        raw, runs = http["raw"], http["http"]
        best_http = max(r["throughput_per_s"] for r in runs)
        ratio = best_http / raw["best"]["images_per_s"]
        one = next(r for r in runs if r["batching"] == "on" and r["clients"] == 1)
        p50_ratio = one["p50_ms"] / raw["batch1_with_preprocessing"]["p50_ms"]
        on = {r["clients"]: r["throughput_per_s"] for r in runs if r["batching"] == "on"}
        off = {r["clients"]: r["throughput_per_s"] for r in runs if r["batching"] == "off"}
        behind = [c for c in on if c >= 8 and c in off and on[c] < off[c]]
        slowest = max(r["p99_ms"] for r in runs)
        model = http["model"]
        rows += [
            f"| {model}: HTTP throughput >= 0.8x the best raw batch | {best_http:.0f} against "
            f"{raw['best']['images_per_s']:.0f} images/s: {ratio:.2f}x | {_met(ratio >= 0.8)} |",
            f"| {model}: one client's p50 <= 1.2x raw with decode and resize | "
            f"{one['p50_ms']:.1f} ms: {p50_ratio:.2f}x | {_met(p50_ratio <= 1.2)} |",
            f"| {model}: batching on >= off from 8 clients, no request waits seconds | "
            f"behind at {behind or 'no'} client counts; worst p99 {slowest:.0f} ms | "
            f"{_met(not behind and slowest < 1000)} |",
        ]
    soak = _load("gpu_soak")
    if soak:
        rows.append(
            f"| p99 <= 20 ms at {soak['offered_per_s']:.0f} images/s offered open-loop | "
            f"p99 {soak['p99_ms']:.1f} ms, codes {soak['status_codes']} | "
            f"{_met(soak['p99_ms'] <= 20)} |"
        )
    if not rows:
        return []
    return ["### Targets", "", "| target | measured | |", "|---|---|---|", *rows, ""]


def _training_rows(run: dict[str, Any]) -> list[str]:
    return [
        f"| {f['family']} | {run['device_name']} | {f['images']} | "
        f"{next(r['images_per_s'] for r in f['records'] if r.get('stage') == 'features'):.1f} | "
        f"{', '.join(f'{x:.1f}' for x in f['images_per_s_per_epoch'])} | "
        f"{f['images_per_s_steady']:.1f} |"
        for f in run["results"]
    ]


def _training_section(title: str, runs: list[dict[str, Any]]) -> list[str]:
    """Training throughput per family and device, from bench.train_speed."""
    return [
        f"## {title}",
        "",
        *(
            f"`{r['command']}` on {_machine(r['machine'])}, torch {r['torch']}, "
            f"{r['steps']} steps of each epoch, load average {r['load_average_1min_at_start']} "
            "at the start."
            for r in runs
        ),
        "",
        "The frozen encoder's feature pass runs once before the epochs; the first epoch",
        "warms up, the steady figure is the mean of the others. An OT image counts once",
        "per ensemble member.",
        "",
        "| family | device | images / epoch | feature pass images / s | images / s per epoch "
        "| steady images / s |",
        "|---|---|---|---|---|---|",
        *(row for r in runs for row in _training_rows(r)),
        "",
    ]


def _placement_section(title: str, placement: dict[str, Any]) -> list[str]:
    """Nodes per execution provider, batch dimension free and pinned (bench.node_placement)."""
    return [
        f"## {title}",
        "",
        f"`{placement['command']}` on {_machine(placement['machine'])}. The server pins",
        "the batch dimension of each per-size session (service/batch_shapes.py), and",
        "onnxruntime then folds the graph's shape computations (Shape, Gather,",
        "Unsqueeze, Concat on int64 shapes) away: under the CUDA provider these run on",
        "the CPU between GPU kernels.",
        "",
        "| model | provider | batch | batch dimension | nodes run | by provider | CPU op types |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r['provider']} | {r['batch']} | {r['batch_dim']} | "
            f"{r['nodes']} | "
            + ", ".join(
                f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in r["by_provider"].items()
            )
            + " | "
            + ", ".join(f"{k} {v}" for k, v in list(r["cpu_op_types"].items())[:8])
            + " |"
            for r in placement["results"]
        ),
        "",
    ]


def _subsection(lines: list[str]) -> list[str]:
    return ["#" + lines[0], *lines[1:]]


def _gpu_sections() -> list[str]:
    model = _load("gpu_model_latency")
    if not model:
        return [
            "## On the GPU",
            "",
            "No GPU was lent to this work yet, so the CUDA provider's figures are not",
            "measured here. `scripts/gpu-bench.sh` runs this page's benchmarks, unchanged,",
            "on a GPU machine and writes the `gpu_*` results this report turns into this",
            "section.",
            "",
        ]
    lines = ["## On the GPU", "", "### The raw model", "", *_model_table(model)]
    lines += _gpu_targets()
    for name, title in GPU_HTTP_RUNS:
        http = _load(name)
        if http:
            lines += _subsection(_http_section(name, title, http))
    soak = _load("gpu_soak")
    if soak:
        lines += _subsection(_soak_section("P-WAE under a fixed open-loop load on the GPU", soak))
    placement = _load("gpu_node_placement")
    if placement:
        lines += _subsection(_placement_section("Graph nodes by provider on the GPU", placement))
    training = [r for r in (_load("gpu_train_speed"), _load("gpu_train_speed_cpu")) if r]
    if training:
        lines += _subsection(_training_section("Training, GPU against CPU", training))
    return lines


# (results file, section title): the server as shipped, then with spinning on.
HTTP_RUNS = [
    ("http_load", "Through HTTP, next to the raw model"),
    ("http_load_spinning", "The same with onnxruntime's threads spinning"),
]


def _http_section(name: str, title: str, http: dict[str, Any]) -> list[str]:
    raw = http["raw"]
    lines = [
        f"## {title}",
        "",
        f"`{http['command']}` on {_machine(http['machine'])}; image {http['image']}; "
        f"{http['cores']}.",
        "",
        f"Raw onnxruntime, batch 1: p50 {raw['batch1']['p50_ms']:.2f} ms "
        f"({raw['batch1_cpu_ms_per_image']:.1f} ms of CPU); with decode and "
        f"resize: p50 {raw['batch1_with_preprocessing']['p50_ms']:.2f} ms; best raw "
        f"throughput {raw['best']['images_per_s']:.1f} images/s at batch {raw['best']['batch']}.",
        "",
        "| batching | clients | p50 ms | p95 ms | p99 ms | images / s | p50 / raw "
        "| throughput / best raw | server CPU ms / image | client CPU ms / image "
        "| status codes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = raw["batch1_with_preprocessing"]["p50_ms"]
    best = raw["best"]["images_per_s"]
    for r in http["http"]:
        lines.append(
            f"| {r['batching']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['throughput_per_s']:.1f} | {r['p50_ms'] / base:.2f} | "
            f"{r['throughput_per_s'] / best:.2f} | {r['server_cpu_ms_per_image']:.1f} | "
            f"{r['client_cpu_ms_per_image']:.1f} | {r['status_codes']} |"
        )
    return [
        *lines,
        "",
        '"p50 / raw" divides by the raw time *with* decode and resize, the work',
        "any deployment does; the raw batch-1 time alone is given above. The CPU",
        "columns are CPU time per answered image, all threads: on shared cores",
        "their sum bounds the throughput at cores x 1000 / (server + client).",
        "",
    ]


def _targets() -> list[str]:
    """The CPU targets against the figures below, met or not."""
    http, soak = _load("http_load"), _load("soak")
    rows = []
    if http:
        raw = http["raw"]
        one = next(r for r in http["http"] if r["batching"] == "on" and r["clients"] == 1)
        sixteen = max(
            (r for r in http["http"] if r["clients"] == 16), key=lambda r: r["throughput_per_s"]
        )
        p50_ratio = one["p50_ms"] / raw["batch1_with_preprocessing"]["p50_ms"]
        session_ratio = one["p50_ms"] / raw["batch1"]["p50_ms"]
        thr_ratio = sixteen["throughput_per_s"] / raw["best"]["images_per_s"]
        rows += [
            f"| one client's HTTP p50 <= 1.15x raw onnxruntime | {one['p50_ms']:.1f} ms: "
            f"{p50_ratio:.2f}x raw with decode and resize, {session_ratio:.2f}x the session "
            f"alone | {_met(p50_ratio <= 1.15)} with decode, {_met(session_ratio <= 1.15)} "
            "without |",
            f"| 16 clients >= 0.9x the best raw throughput | {sixteen['throughput_per_s']:.1f} "
            f"against {raw['best']['images_per_s']:.1f} images/s: {thr_ratio:.2f}x | "
            f"{_met(thr_ratio >= 0.9)} |",
        ]
    if soak:
        rows += [
            f"| p99 <= 3x p50 at 80% of the maximum throughput | p99 {soak['p99_ms']:.1f} ms, "
            f"p50 {soak['p50_ms']:.1f} ms: {soak['p99_over_p50']:.2f}x | "
            f"{_met(soak['p99_over_p50'] <= 3)} |",
            f"| server memory flat within 10% over {soak['seconds']:.0f} s | "
            f"{100 * soak['rss_growth']:+.1f}% | {_met(abs(soak['rss_growth']) <= 0.10)} |",
        ]
    if not rows:
        return []
    return [
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *rows,
        "",
        *_bounds(http),
    ]


def _bounds(http: dict[str, Any] | None) -> list[str]:
    """What bounds the throughput on shared cores, from the CPU each side spends."""
    if not http:
        return []
    cores = http["machine"]["cores"]
    sixteen = max(
        (r for r in http["http"] if r["clients"] == 16), key=lambda r: r["throughput_per_s"]
    )
    cpu = sixteen["server_cpu_ms_per_image"] + sixteen["client_cpu_ms_per_image"]
    bound = cores * 1000 / cpu
    best = http["raw"]["best"]["images_per_s"]
    inference = cores * 1000 / best  # CPU ms per image of the raw session at its best
    lines = [
        "What bounds the throughput: with 16 clients the server spent "
        f"{sixteen['server_cpu_ms_per_image']:.1f} ms of CPU per image and the client "
        f"{sixteen['client_cpu_ms_per_image']:.1f} ms, so {cores} cores cannot answer more "
        f"than {cores} x 1000 / {cpu:.1f} = {bound:.1f} images/s ({bound / best:.2f}x the best "
        f"raw throughput), and it answered {sixteen['throughput_per_s']:.1f}. The raw session "
        f"at its best keeps both cores busy for {inference:.1f} ms of CPU per image, so every "
        "millisecond of decode, HTTP and hand-over between threads comes out of the same "
        "cores: 0.9x the raw throughput leaves the server "
        f"{inference / 0.9 - inference:.1f} ms of CPU per image for all of it.",
        "",
    ]
    profile = _load("profile_server")
    if profile:
        top = ", ".join(
            f"{name} {100 * n / profile['samples']:.0f}%"
            for name, n in list(profile["buckets"].items())[:6]
        )
        lines += [f"The server's CPU under 16 clients, by py-spy (section below): {top}.", ""]
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


SOAK_RUNS = [
    ("soak", "Sustained load"),
    ("soak_batch8", "Sustained load with batches of up to 8"),
]


def _soak_section(title: str, soak: dict[str, Any]) -> list[str]:
    # On the CPU provider the server runs one image at a time unless told otherwise.
    one_at_a_time = soak["server_settings"].get("max_batch_size", "1") == "1"
    rss = soak["rss_mb"]
    windows = soak["windows"]
    calm = sum(w["max_ms"] <= 3 * soak["p50_ms"] for w in windows)
    worst = max(windows, key=lambda w: w["max_ms"])
    return [
        f"## {title}",
        "",
        f"`{soak['command']}` on {_machine(soak['machine'])}, server settings "
        f"{soak['server_settings']}: requests offered open-loop at "
        f"{soak['offered_per_s']:.1f}/s, "
        + (
            f"a fixed rate (16 clients reached {soak['peak_throughput_per_s']:.1f}/s)."
            if soak.get("fixed_rate")
            else f"80% of the {soak['peak_throughput_per_s']:.1f}/s measured with 16 clients."
        )
        + f" p50 {soak['p50_ms']:.1f} ms, p99 {soak['p99_ms']:.1f} ms "
        f"(p99 / p50 = {soak['p99_over_p50']:.2f}), latency counted from the time each "
        f"request was due; status codes {soak['status_codes']}, client errors "
        f"{soak['client_errors'] or 'none'}; server RSS {rss[0][1]:.0f} MB after warm-up, "
        f"{rss[-1][1]:.0f} MB at the end ({100 * soak['rss_growth']:+.1f}%; over the "
        f"second half {100 * soak['rss_growth_second_half']:+.1f}%). {soak['cores']}.",
        "",
        f"In {calm} of the {len(windows)} 10-s windows no request took more than 3x the "
        f"p50; the worst window, from {worst['from_s']} s, had p50 {worst['p50_ms']:.0f} ms "
        f"and its slowest request took {worst['max_ms']:.0f} ms.",
        "",
        *(_machine_variance(windows) if one_at_a_time else []),
        "The server's own inference and decode time per image in each window (from its",
        "/metrics) tell a machine that slowed down, where inference time grows with the",
        "latency, from a server that queues on a steady machine."
        + ("" if one_at_a_time else " Here an image's inference time is its batch's."),
        "",
        "| from s | requests | p50 ms | p99 ms | max ms | server inference ms | server decode ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {w['from_s']} | {w['n']} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | "
            f"{w['max_ms']:.1f} | {w.get('inference_ms', '-')} | {w.get('decode_ms', '-')} |"
            for w in windows
        ),
        "",
    ]


def _machine_variance(windows: list[dict[str, Any]]) -> list[str]:
    """How much the machine's own speed moved during a soak, from the server's inference time."""
    timed = [w for w in windows if "inference_ms" in w]
    if len(timed) < 6:
        return []
    by_speed = sorted(timed, key=lambda w: w["inference_ms"])
    slow, rest = by_speed[-3:], by_speed[:-3]
    median = by_speed[len(by_speed) // 2]["inference_ms"]
    rest_p99 = sorted(w["p99_ms"] for w in rest)[len(rest) // 2]
    slow_p99 = ", ".join(f"{w['p99_ms']:.0f}" for w in slow)
    return [
        f"The server's inference time per image moved from {by_speed[0]['inference_ms']:.1f} "
        f"to {by_speed[-1]['inference_ms']:.1f} ms across the windows (median {median:.1f}) "
        "with the same model and load: the machine itself slowed down at times. The three "
        f"windows with the slowest inference had p99 "
        f"{slow_p99} ms, against a median p99 of "
        f"{rest_p99:.0f} ms in the others: at a fixed offered rate, a machine running up to "
        f"{100 * (by_speed[-1]['inference_ms'] / median - 1):.0f}% slower than its median "
        "turns 80% load into a queue.",
        "",
    ]


def main() -> None:
    lines = [
        "# Performance",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json`; each",
        "section names the command that measured it and the machine it ran on.",
        "",
    ]
    model = _load("model_latency")
    if model:
        lines += ["## The raw model", "", *_model_table(model)]
    lines += _targets()
    for name, title in HTTP_RUNS:
        http = _load(name)
        if http:
            lines += _http_section(name, title, http)
    growth = _load("image_growth")
    if growth:
        lines += [
            "## Cost as the posted image grows",
            "",
            f"`{growth['command']}` on {_machine(growth['machine'])}.",
            "",
            "| frame | format | MB | decode + resize ms | inference ms | total ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in growth["rows"]:
            lines.append(
                f"| {r['width']}x{r['height']} | {r['format']} | {r['bytes'] / 2**20:.2f} | "
                f"{r['preprocess_p50_ms']:.1f} | {r['inference_p50_ms']:.1f} | "
                f"{r['total_p50_ms']:.1f} |"
            )
        lines.append("")
    profile = _load("profile_server")
    if profile:
        load = profile["load"]
        lines += [
            "## Where the server's CPU goes",
            "",
            f"`{profile['command']}` on {_machine(profile['machine'])}: py-spy "
            f"sampled every server thread while {profile['clients']} clients ran "
            f"({load['throughput_per_s']:.1f} images/s, server CPU "
            f"{load['server_cpu_ms_per_image']:.1f} ms per image); {profile['samples']} "
            f"samples on a CPU, each put in the bucket of its innermost known frame.",
            "",
            "| where | share of the server's CPU samples |",
            "|---|---|",
            *(
                f"| {name} | {100 * n / profile['samples']:.1f}% |"
                for name, n in profile["buckets"].items()
            ),
            "",
        ]
    for name, title in SOAK_RUNS:
        soak = _load(name)
        if soak:
            lines += _soak_section(title, soak)
    placement = _load("node_placement")
    if placement:
        lines += _placement_section("Graph nodes by provider", placement)
    training = _load("train_speed")
    if training:
        lines += _training_section("Training", [training])
    lines += _gpu_sections()
    OUT.write_text("\n".join(lines))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
