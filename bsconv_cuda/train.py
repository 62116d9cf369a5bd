"""The BSConv paper's CIFAR training recipe with the model fused by :func:`bsconv_cuda.convert`.

``python -m bsconv_cuda.train --architecture cifar_mobilenetv3_large_w1_bsconvs_p1d6 --dataset cifar100 \
--data-root DIR``

Architectures are bsconv's (``bsconv.pytorch.get_model`` names); the defaults are the settings of bsconv's own
training script (``bin/bsconv_pytorch_train.py`` in the BSConv repository): SGD with learning rate 0.1, momentum 0.9,
weight decay 1e-4, batch 128, 200 epochs, learning rate x0.1 after epochs 100, 150 and 180, random 32x32 crops of
the 4-padded image and horizontal flips, and for BSConv-S models ``model.reg_loss(alpha=0.1)`` added to the loss.
The same flag names as that script where they exist. Needs bsconv and torchvision (test dependencies of
bsconv-cuda, imported only here).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backends
from .convert import convert

# torchvision's folder names of the extracted "python version" archives, and where those archives are
CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", 100),
}
FAKE_DATA_SIZES = {"train": 50_000, "val": 10_000}  # as many images as CIFAR has (generated on the fly)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bsconv_cuda.train",
        description="Train a bsconv model on CIFAR-10/100 with the BSConv paper's recipe, fused by "
                    "bsconv_cuda.convert.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-a", "--architecture", default="cifar_mobilenetv3_large_w1_bsconvs_p1d6",
                        help="bsconv.pytorch.get_model name")
    parser.add_argument("-d", "--dataset", choices=sorted(CIFAR), default="cifar100")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("-r", "--data-root", type=Path,
                      help="folder holding torchvision's extracted CIFAR archive (cifar-10-batches-py/ or "
                           "cifar-100-python/); nothing is downloaded")
    data.add_argument("--fake-data", action="store_true",
                      help="random images (torchvision's FakeData, CIFAR-sized) instead of CIFAR: for smoke runs")
    parser.add_argument("-e", "--epochs", type=int, default=200)
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("-l", "--learning-rate", type=float, default=0.1)
    parser.add_argument("-s", "--schedule", type=int, nargs="+", default=[100, 150, 180],
                        help="epochs after which the learning rate is multiplied by --gamma")
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("-m", "--momentum", type=float, default=0.9)
    parser.add_argument("-w", "--weight-decay", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="weight of the BSConv-S regularization loss (models that have reg_loss)")
    parser.add_argument("--unfused", action="store_true", help="train the model as built (no bsconv_cuda.convert)")
    parser.add_argument("--backend", choices=backends.BACKEND_CHOICES, default="auto",
                        help="backend of the fused blocks")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-j", "--workers", type=int, default=4, help="data loading worker processes")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                        help="last.pt (after every epoch) and best.pt (best validation accuracy) go here")
    parser.add_argument("--resume", type=Path,
                        help="continue from this checkpoint (a last.pt): model, optimizer, learning-rate schedule "
                             "and epoch")
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="at most this many training and validation batches per epoch (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    args = parser.parse_args(argv)
    if args.data_root is None and not args.fake_data:
        parser.error("give --data-root DIR (CIFAR on disk) or --fake-data")
    for name in ("epochs", "batch_size", "limit_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def _import(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(
            f"python -m bsconv_cuda.train needs {module.split('.')[0]} for {purpose} ({error}); "
            f"install it with: pip install {module.split('.')[0]}"
        ) from error


def build_model(architecture: str, num_classes: int) -> torch.nn.Module:
    bsconv_pytorch = _import("bsconv.pytorch", "the model architectures")
    try:
        return bsconv_pytorch.get_model(architecture, num_classes=num_classes)
    except ValueError as error:
        raise SystemExit(
            f"--architecture {architecture!r}: {error} (see bsconv.pytorch.get_mobilenet's list)"
        ) from None


def datasets(args: argparse.Namespace):
    """(train, validation) datasets: CIFAR from --data-root, or FakeData of the same size and shape."""
    torchvision = _import("torchvision", "the CIFAR datasets and transforms")
    transforms = torchvision.transforms
    train_transform = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    val_transform = transforms.ToTensor()
    dataset_class, folder, url, num_classes = CIFAR[args.dataset]
    if args.fake_data:
        return tuple(
            torchvision.datasets.FakeData(size=FAKE_DATA_SIZES[split], image_size=(3, 32, 32), num_classes=num_classes,
                                          transform=transform, random_offset=offset)
            for split, transform, offset in (("train", train_transform, 0), ("val", val_transform, 1 << 20))
        )
    if not (args.data_root / folder).is_dir():
        raise SystemExit(
            f"--data-root {args.data_root}: {args.dataset} not found: expected the folder {args.data_root / folder}/ "
            f"(torchvision's {dataset_class} layout). This command does not download: get {url}, extract it into "
            f"{args.data_root} (tar -xzf {url.rsplit('/', 1)[1]} -C {args.data_root}), or use --fake-data."
        )
    dataset_class = getattr(torchvision.datasets, dataset_class)
    return (dataset_class(root=str(args.data_root), train=True, download=False, transform=train_transform),
            dataset_class(root=str(args.data_root), train=False, download=False, transform=val_transform))


@dataclass
class TrainState:
    """What a checkpoint holds besides the model, optimizer and scheduler."""

    epoch: int = 0  # epochs completed
    best_accuracy: float = -1.0
    best_epoch: int = 0
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each completed epoch


class Progress:
    """One status line per epoch: redrawn in place on a terminal (at most twice a second), printed every tenth of the
    epoch otherwise."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stdout.isatty()
        self.every = max(1, total // 10)
        self.last_draw = -math.inf

    def due(self, done: int) -> bool:
        if not self.enabled:
            return False
        if done == self.total:
            return True
        return time.perf_counter() - self.last_draw >= 0.5 if self.tty else done % self.every == 0

    def draw(self, done: int, loss: float, accuracy: float, images_per_s: float) -> None:
        self.last_draw = time.perf_counter()
        width = 24
        filled = width * done // self.total
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} loss {loss:.4f} "
                f"acc {100 * accuracy:.2f}% {images_per_s:,.0f} img/s")
        print(f"\r{line}" if self.tty else line, end="" if self.tty and done < self.total else "\n", flush=True)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    seconds: float
    images: int


def run_epoch(model, loader, device, args, *, optimizer=None, label: str = "") -> EpochResult:
    """One pass over ``loader`` (at most --limit-batches batches), training when ``optimizer`` is given."""
    training = optimizer is not None
    model.train(training)
    batches = len(loader) if args.limit_batches is None else min(len(loader), args.limit_batches)
    progress = Progress(label, batches, enabled=not args.no_progress)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    # summed on the device: reading them back every step would wait for the GPU
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    with torch.set_grad_enabled(training):
        for step, (images, targets) in enumerate(loader, start=1):
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with autocast:
                logits = model(images)
                loss = F.cross_entropy(logits, targets)
                if hasattr(model, "reg_loss"):  # BSConv-S: orthonormality regularization of the pointwise weights
                    loss = loss + model.reg_loss(alpha=args.alpha)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach() * len(targets)
            correct += (logits.argmax(dim=1) == targets).sum()
            seen += len(targets)
            if progress.due(step):
                progress.draw(step, loss_sum.item() / seen, correct.item() / seen, seen / (time.perf_counter() - start))
            if step == batches:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochResult(loss_sum.item() / seen, correct.item() / seen, time.perf_counter() - start, seen)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState, args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "state": vars(state), "architecture": args.architecture, "dataset": args.dataset, "fused": not args.unfused,
    }
    temporary = path.with_suffix(".tmp")
    torch.save(checkpoint, temporary)
    temporary.replace(path)  # a crash while saving leaves the previous checkpoint intact


def load_checkpoint(path: Path, model, optimizer, scheduler, args) -> TrainState:
    if not path.is_file():
        raise SystemExit(f"--resume {path}: no such checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("architecture", "dataset"):
        if checkpoint[key] != getattr(args, key):
            raise SystemExit(f"--resume {path}: checkpoint is for --{key} {checkpoint[key]}, not {getattr(args, key)}")
    # converting keeps the state_dict keys: a fused run resumes an unfused checkpoint and the other way round
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return TrainState(**checkpoint["state"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train_set, val_set = datasets(args)
    num_classes = CIFAR[args.dataset][3]
    model = build_model(args.architecture, num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not args.unfused:
        model, summary = convert(model, backend=args.backend, return_summary=True)
        print(summary)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.schedule, gamma=args.gamma)
    state = TrainState()
    if args.resume is not None:
        state = load_checkpoint(args.resume, model, optimizer, scheduler, args)
        print(f"resumed from {args.resume} after epoch {state.epoch}")
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda",
                         persistent_workers=args.workers > 0)
    generator = torch.Generator().manual_seed(args.seed + state.epoch)  # a resumed run gets other shuffles
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=generator, **loader_kwargs)
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_kwargs)
    print(f"{args.architecture} on {args.dataset}{' (fake data)' if args.fake_data else ''}, "
          f"{'unfused' if args.unfused else f'fused (backend {args.backend})'}, {device}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {'channels_last' if args.channels_last else 'NCHW'}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    for epoch in range(state.epoch + 1, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train = run_epoch(model, train_loader, device, args, optimizer=optimizer,
                          label=f"epoch {epoch}/{args.epochs} train")
        val = run_epoch(model, val_loader, device, args, label=f"epoch {epoch}/{args.epochs} val  ")
        scheduler.step()
        state.epoch = epoch
        state.epoch_seconds.append(train.seconds)
        if val.accuracy > state.best_accuracy:
            state.best_accuracy, state.best_epoch = val.accuracy, epoch
            save_checkpoint(args.checkpoint_dir / "best.pt", model, optimizer, scheduler, state, args)
        save_checkpoint(args.checkpoint_dir / "last.pt", model, optimizer, scheduler, state, args)
        print(f"epoch {epoch}/{args.epochs}: lr {lr:g}, train loss {train.loss:.4f} acc {100 * train.accuracy:.2f}% "
              f"({train.images / train.seconds:,.0f} img/s, {train.seconds:.1f} s), val loss {val.loss:.4f} acc "
              f"{100 * val.accuracy:.2f}% (best {100 * state.best_accuracy:.2f}% @ epoch {state.best_epoch})",
              flush=True)
    print(final_line(state, device))
    return 0


def final_line(state: TrainState, device: torch.device) -> str:
    if not state.epoch_seconds:
        return f"no epoch to train: the checkpoint has {state.epoch} epoch(s), --epochs asks for no more"
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB" if device.type == "cuda"
            else "n/a (not on a GPU)")
    seconds = sum(state.epoch_seconds) / len(state.epoch_seconds)
    return (f"best val acc {100 * state.best_accuracy:.2f}% (epoch {state.best_epoch}), {seconds:.1f} s/epoch "
            f"(training), peak GPU memory {peak}")


if __name__ == "__main__":
    sys.exit(main())
