"""Training-step benchmark (not a test): a bundled model's network, one supervised step (forward, Dice + CE loss,
backward, AdamW) on random patches of its card's size, in fp32 and under the precision training uses on this
device (``hybridmim.precision``: bf16 autocast on CUDA and on CPUs with bf16 units), interleaved in one process.
Prints the median step time of each and their ratio.

    python Testing/Benchmarks/benchmark_training_step.py [--model la-cnn] [--batch 2] [--steps 15] [--threads N]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hybridmim.model_card import ModelCard
from hybridmim.model_store import resolve_model
from hybridmim.networks import build_network
from hybridmim.precision import cpu_has_bf16, training_autocast, training_precision
from hybridmim.semisupervised import weighted_dice_ce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="la-cnn", help="bundled model id or folder (its network and patch)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per precision (after 3 warm-up steps)")
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = ModelCard.load(resolve_model(args.model))
    torch.manual_seed(0)
    network = build_network(card.architecture["name"], card.in_channels, card.out_channels,
                            **card.architecture.get("args", {})).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    images = torch.randn(args.batch, card.in_channels, *card.patch_size, device=device)
    labels = torch.randint(0, card.out_channels, (args.batch, 1, *card.patch_size), device=device)
    weights = torch.ones_like(labels, dtype=torch.float32)
    contexts = {"fp32": torch.autocast(device.type, enabled=False),
                training_precision(device): training_autocast(device)}

    def step(context) -> float:
        started = time.perf_counter()
        with context:
            loss = weighted_dice_ce(network(images), labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {name: [] for name in contexts}
    for context in contexts.values():
        for _ in range(3):
            step(context)
    for _ in range(args.steps):  # interleaved: load changes affect both alike
        for name, context in contexts.items():
            times[name].append(step(context))
    medians = {name: statistics.median(values) for name, values in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{card.id}: batch {args.batch} x {card.patch_size}, {where}, CPU bf16 units: {cpu_has_bf16()}")
    for name, median in medians.items():
        print(f"  {name:5s} {median:.3f} s per step")
    if len(medians) == 2:
        print(f"  ratio fp32 / {training_precision(device)}: {medians['fp32'] / medians['bf16']:.2f}x")


if __name__ == "__main__":
    main()
