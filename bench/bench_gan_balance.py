"""How large is the adversarial term of the WGAN-GP generator loss against the L1 term? Basis for choosing λ_adv.

The generator loss of stage 2 is L1(G(b), χ) + λ_adv·(−D(G(b))). What steers the generator is the gradient of
each term with respect to its parameters, not the loss values (the critic's output has an arbitrary offset). This
script loads a generator (stage-1 weights) and a trained critic (from a stage-2 resume checkpoint), draws batches
from the training stream of ``configs/train.json`` and prints ‖∇θ L1‖, ‖∇θ(−D(G(b)))‖ and, for several λ_adv, the
ratio λ_adv·‖∇adv‖/‖∇L1‖ and the cosine between the two gradients. A ratio well below 1 keeps the supervised term
in charge (the adversarial term sharpens); a ratio near or above 1 lets the critic drive the generator.

Usage (from the repository root)::

    cat bundle/models/checkpoints/stage2/checkpoint_epoch=5.pt.part* > /tmp/stage2.pt
    python bench/bench_gan_balance.py --critic_checkpoint /tmp/stage2.pt [--generator bundle/models/model.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import torch
from monai.bundle import ConfigParser

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=str(BUNDLE / "models/model.pt"), help="generator state dict")
    parser.add_argument("--critic_checkpoint", required=True, help="stage-2 checkpoint with a 'critic' entry")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=12345, help="stream seed (not the training seed 0)")
    args = parser.parse_args()
    generator_path, critic_path = os.path.abspath(args.generator), os.path.abspath(args.critic_checkpoint)
    os.chdir(BUNDLE)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = ConfigParser()
        config.read_config([str(BUNDLE / "configs/train.json"), str(BUNDLE / "configs/train_gan.json")])
        config.update({"output_dir": tmp, "pretrained": None, "seed": args.seed, "device": "$torch.device('cpu')"})
        generator, critic = config.get_parsed_content("network"), config.get_parsed_content("critic_network")
        loader = config.get_parsed_content("train#dataloader")
    state = torch.load(generator_path, map_location="cpu", weights_only=True)
    generator.load_state_dict(state.get("model", state))
    critic.load_state_dict(torch.load(critic_path, map_location="cpu", weights_only=True)["critic"])
    generator.train()  # as in the generator step (batch statistics)
    critic.eval().requires_grad_(False)
    params = [p for p in generator.parameters() if p.requires_grad]
    rows = []
    for i, batch in zip(range(args.batches), loader):
        pred = generator(batch["image"])
        g_l1 = flat_grad((pred - batch["label"]).abs().mean(), params)
        g_adv = flat_grad(-critic(pred).float().mean(), params)
        rows.append(
            {
                "grad_l1": g_l1.norm().item(),
                "grad_adv": g_adv.norm().item(),
                "cosine": torch.nn.functional.cosine_similarity(g_l1, g_adv, dim=0).item(),
            }
        )
        row = rows[-1]
        print(f"batch {i}: ‖∇L1‖ {row['grad_l1']:.4g}  ‖∇adv‖ {row['grad_adv']:.4g}  cos {row['cosine']:+.3f}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    summary = {
        "mean": mean,
        "ratio": {f"{lam:g}": lam * mean["grad_adv"] / mean["grad_l1"] for lam in args.lambdas},
    }
    for lam, ratio in summary["ratio"].items():
        print(f"λ_adv {lam}: λ·‖∇adv‖/‖∇L1‖ = {ratio:.3f}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
