#!/usr/bin/env python
"""Measure a Detectron2 model: parameters, FLOPs, inference latency and memory, and optionally training.

Works on any Detectron2 config, so DINO and Detectron2's own baselines are measured the same way:

    python tools/benchmark.py --config-file configs/dino_r50_4scale.yaml --json out/dino4.json
    python tools/benchmark.py --config-file zoo:COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml --json out/frcnn.json
    python tools/benchmark.py --summarize out/*.json --markdown out/table.md --plot out/ap_vs_latency.png

Weights are random (MODEL.WEIGHTS is cleared): cost does not depend on them. ``--compare-reference`` also
times the model with the pure-PyTorch multi-scale deformable attention and reports the speed ratio.
``--backends`` times DINO's exported inference path (``dino_detr.export``) on each runtime side by side,
round-robin (one call of each backend per round), so that a shared machine's changing load is spread evenly
(on a machine with more runnable threads than cores, run PyTorch with ``OMP_WAIT_POLICY=PASSIVE``: spinning
OpenMP threads otherwise lose most of their time to the oversubscription):

    OMP_WAIT_POLICY=PASSIVE python tools/benchmark.py --config-file configs/dino_r50_4scale.yaml --size 800 1216 \
        --no-flops --threads 2 --backends-only \
        --backends eager eager-bf16 aoti onnxruntime openvino-f32 openvino-bf16 --json out/dino4_backends.json

``-bf16`` backends run the model prepared for bfloat16 inference (``MODEL.DINO.INFERENCE_DTYPE``); the
plain model measurement honours ``MODEL.DINO.INFERENCE_DTYPE`` given as a config override.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from dino_detr import config_file_path, get_dino_cfg  # (registers DINO)
from dino_detr.analysis import count_flops
from dino_detr.export import BACKENDS, build_runtime, example_inputs
from dino_detr.layers import MSDeformAttn, use_reference_implementation
from dino_detr.modeling.inference_precision import native_bfloat16

from cpu_allocator import reuse_freed_cpu_memory
from measure import machine_name, measure_inference, measure_training, reset_peak_memory, rss_kib
from published import PUBLISHED_AP
from user_errors import run_tool


def load_cfg(config_file, device, opts):
    if config_file.startswith("zoo:"):
        from detectron2 import model_zoo

        config_file = model_zoo.get_config_file(config_file[4:])
    path = config_file_path(config_file)  # a dino_detr://<name>: the config file of those weights
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = get_dino_cfg(config_file, opts)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg, path


def model_key(config_file):
    name = os.path.splitext(os.path.basename(config_file))[0]
    for suffix in ("_1x", "_3x"):
        name = name.removesuffix(suffix)
    return name


def num_classes(cfg):
    """Number of classes of a DINO or Detectron2 detector config."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "DinoDetr":
        return cfg.MODEL.DINO.NUM_CLASSES
    return cfg.MODEL.RETINANET.NUM_CLASSES if arch == "RetinaNet" else cfg.MODEL.ROI_HEADS.NUM_CLASSES


def make_inputs(height, width, device, with_targets, num_classes=80, num_boxes=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8).float().to(device)
    sample = {"image": image, "height": height, "width": width}
    if with_targets:
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = (torch.rand(num_boxes, 2, generator=g) * 0.25 + 0.05) * torch.tensor([width, height])
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1).to(device))
        inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g).to(device)
        sample["instances"] = inst
    return [sample]


def benchmark_backends(model, size, backends, warmup, repeats):
    """Latency, peak memory and build time (export / compilation) of each backend on one
    normalized image of ``size``, with the largest difference from eager of scores and boxes.

    The backends are timed round-robin (one call of each in turn, ``repeats`` rounds), so that a
    change in the machine's load during the run affects all of them alike; the median of each is
    reported. Peak memory: the process's peak resident set during the backend's first call, all
    runtimes loaded.
    """
    images, sizes = example_inputs(*size, batch=1)
    with torch.no_grad():
        reference = build_runtime("eager", model, size, "")(images, sizes)
    results, runs = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for backend in backends:
            start = time.perf_counter()
            with torch.no_grad():
                run = build_runtime(backend, model, size, workdir)
                reset_peak_memory(torch.device("cpu"))
                outputs = run(images, sizes)  # the first call compiles (torch.compile)
            result = {"build_s": time.perf_counter() - start, "peak_mem_mib": rss_kib("VmHWM") / 1024}
            result["max_abs_diff_boxes"] = float((outputs[0].float() - reference[0]).abs().max())
            result["max_abs_diff_scores"] = float((outputs[1].float() - reference[1]).abs().max())
            result["same_classes"] = bool(torch.equal(outputs[2].long(), reference[2]))
            results[backend], runs[backend] = result, run
            del outputs
        times = {backend: [] for backend in backends}
        with torch.no_grad():
            for round_index in range(warmup + repeats):
                for backend, run in runs.items():
                    t0 = time.perf_counter()
                    run(images, sizes)
                    if round_index >= warmup:
                        times[backend].append(time.perf_counter() - t0)
        for backend in backends:
            results[backend].update(latency_s=statistics.median(times[backend]), latency_all_s=times[backend])
    return results


def benchmark(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # Same allocator setting for every model and both MSDA implementations (see cpu_allocator.py).
    allocator_tuned = args.device == "cpu" and reuse_freed_cpu_memory()
    device = torch.device(args.device)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    cfg, config_file = load_cfg(args.config_file, args.device, args.opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    h, w = args.size
    result = {
        "config": args.config_file,
        "command": " ".join(["python", "tools/benchmark.py", *sys.argv[1:]]),
        "model": model_key(config_file),
        "machine": machine_name(device),
        "native_bf16": native_bfloat16(device) or "none",
        "device": args.device,
        "torch": torch.__version__,
        "amp": args.amp,
        "amp_dtype": args.amp_dtype,
        "threads": torch.get_num_threads(),
        "cpu_allocator_reuse": allocator_tuned,
        "input": [h, w],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "published_ap": PUBLISHED_AP.get(model_key(config_file), []),
    }
    inputs = make_inputs(h, w, device, with_targets=False)
    if not args.backends_only:
        result["inference"] = measure_inference(model, inputs, args.warmup, args.repeats, args.amp, amp_dtype)
    if args.backends:
        if cfg.MODEL.META_ARCHITECTURE != "DinoDetr" or args.device != "cpu":
            raise SystemExit("--backends: DINO configs on the CPU only")
        result["backends"] = benchmark_backends(model, (h, w), args.backends, args.warmup, args.repeats)
    if args.compare_reference:
        if not any(isinstance(m, MSDeformAttn) for m in model.modules()):
            raise SystemExit("--compare-reference: this model does not use dino_detr's MSDA op")
        with use_reference_implementation():
            ref = measure_inference(model, inputs, args.warmup, args.repeats, args.amp, amp_dtype)
        result["inference_reference_msda"] = ref
        result["speedup_vs_reference_msda"] = ref["latency_s"] / result["inference"]["latency_s"]
    if args.train:
        train_inputs = make_inputs(h, w, device, with_targets=True, num_classes=num_classes(cfg)) * args.train_batch
        result["train_batch"] = args.train_batch
        result["training"] = measure_training(
            model, train_inputs, args.warmup, max(1, args.repeats // 2), args.amp, amp_dtype
        )
    # Counted last: on the CPU the heap keeps what the tracer allocated (see cpu_allocator.py),
    # which would otherwise show up in the peak memory measured after it.
    if not args.no_flops:
        model.eval()
        total, by_op, skipped = count_flops(model, inputs[0]["image"])
        result.update(gflops=total / 1e9, gflops_by_op={k: v / 1e9 for k, v in by_op.items()}, skipped_ops=skipped)
    return result


def markdown_table(results):
    rows = [
        "| model | published COCO box AP | params (M) | GFLOPs | input | device | latency (s/img) | "
        "peak mem (MiB) | train s/iter (peak MiB) | machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in results if "inference" in r):
        ap = ", ".join(f"{s} {a}" for s, a, _ in r["published_ap"]) or "-"
        train = (
            f"{r['training']['iter_s']:.2f} ({r['training']['peak_mem_mib']:.0f}, batch {r.get('train_batch', '?')})"
            if "training" in r
            else "-"
        )
        gflops = f"{r['gflops']:.0f}" if "gflops" in r else "-"
        lat = f"{r['inference']['latency_s']:.3f}"
        if "speedup_vs_reference_msda" in r:
            lat += (
                f" (reference MSDA {r['inference_reference_msda']['latency_s']:.3f}; "
                f"{r['speedup_vs_reference_msda']:.2f}x)"
            )
        dev = r["device"] + (" AMP" if r["amp"] else "")
        rows.append(
            f"| {r['model']} | {ap} | {r['params_m']:.1f} | {gflops} | {r['input'][0]}x{r['input'][1]} | {dev} "
            f"| {lat} | {r['inference']['peak_mem_mib']:.0f} | {train} | {r['machine']} |"
        )
    rows += backends_table(results)
    commands = [f"- {r['model']}: `{r['command']}`" for r in results if "command" in r]
    if commands:
        rows += ["", "Commands:", "", *commands]
    return "\n".join(rows)


def backends_table(results):
    """Rows of the side-by-side table of ``--backends`` results (empty when there are none): each backend's
    speed relative to eager and to the fastest OpenVINO precision of the same run."""
    rows = [
        "",
        "| model | input | backend | latency (s/img) | vs eager | vs best OpenVINO | peak mem (MiB) | build (s) | "
        "max diff scores / boxes vs eager | machine (native bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    found = False
    for r in results:
        backends = r.get("backends", {})
        eager = backends.get("eager")
        openvino = [b["latency_s"] for name, b in backends.items() if name.startswith("openvino")]
        for name, b in backends.items():
            found = True
            ratio = f"{eager['latency_s'] / b['latency_s']:.2f}x" if eager else "-"
            vs_openvino = f"{min(openvino) / b['latency_s']:.2f}x" if openvino else "-"
            same = "" if b["same_classes"] else " (classes differ)"
            rows.append(
                f"| {r['model']} | {r['input'][0]}x{r['input'][1]} | {name} | {b['latency_s']:.3f} | {ratio} | "
                f"{vs_openvino} | {b['peak_mem_mib']:.0f} | {b['build_s']:.0f} | {b['max_abs_diff_scores']:.1e} / "
                f"{b['max_abs_diff_boxes']:.1e}{same} | {r['machine']} ({r.get('native_bf16', '?')}) |"
            )
    return rows if found else []


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if not r["published_ap"] or "inference" not in r:
            continue
        best = max(ap for _, ap, _ in r["published_ap"])
        ax.scatter(r["inference"]["latency_s"], best, s=40)
        ax.annotate(
            f"{r['model']} ({r['device']})",
            (r["inference"]["latency_s"], best),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("inference latency, batch 1 (s/img, measured)")
    ax.set_ylabel("best published COCO val2017 box AP")
    ax.set_title(results[0]["machine"] if results else "")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", help="a YAML path, or zoo:<path> for a Detectron2 model-zoo config")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA unless --amp-dtype)")
    parser.add_argument("--amp-dtype", choices=["float16", "bfloat16"], help="autocast's dtype with --amp")
    parser.add_argument("--train", action="store_true", help="also time training iterations")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument(
        "--compare-reference",
        action="store_true",
        help="also time with the pure-PyTorch MSDA op and report the speed ratio",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=[],
        help="also time DINO's exported inference path on these CPU runtimes (H, W multiples of 32)",
    )
    parser.add_argument(
        "--backends-only", action="store_true", help="with --backends: skip the Detectron2 model's own timing"
    )
    parser.add_argument("--json", help="write the result (or, with --summarize, all results) here")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="combine earlier results")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--plot", help="with --summarize: write an AP-vs-latency PNG here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    if args.summarize:
        results = []
        for path in args.summarize:
            with open(path) as f:
                results.append(json.load(f))
    elif args.config_file:
        results = [benchmark(args)]
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results[0], f, indent=1)
    else:
        parser.error("give --config-file or --summarize")
    table = markdown_table(results)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    sys.exit(run_tool(main))
