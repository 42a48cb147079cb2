"""Trains the learning-test runs and draws their reward curves into docs/learning_curves.png.

Each run also scores its policy greedily every 10 steps on 32 fixed prompts (``eval.*``);
validation leaves the training itself unchanged.

Usage: python docs/learning_curves.py [WORKROOT]
"""

import os
import subprocess
import sys

RUNS = {
    "GRPO copy": ["--config=configs/copy.py"],
    "PPO copy": ["--config=configs/copy.py", "experiment.algorithm=ppo", "experiment.steps=120",
                 "rollout.prompts_per_step=16"],
    "GRPO addition": ["--config=configs/addition.py"],
    "PPO addition": ["--config=configs/addition.py", "experiment.algorithm=ppo",
                     "rollout.prompts_per_step=16"],
}  # fmt: skip
EVAL = ["eval.interval=10", "eval.prompts=32"]  # greedy, the same 32 prompts each time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(root: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from novarl_jax.trainer.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, args in RUNS.items():
        workdir = os.path.abspath(os.path.join(root, name.replace(" ", "_").lower()))
        if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            subprocess.run(
                [sys.executable, "-m", "novarl_jax.train", *args, f"--workdir={workdir}",
                 "logging.progress=False", "logging.plot=False", *EVAL],
                check=True, cwd=ROOT,  # the configs' paths are the repository's
            )  # fmt: skip
        rows = read_metrics(workdir)
        steps = [r["step"] for r in rows]
        scores = [r["critic/score/mean"] for r in rows]
        smooth = [sum(scores[max(0, i - 4) : i + 1]) / len(scores[max(0, i - 4) : i + 1])
                  for i in range(len(scores))]  # fmt: skip
        line = ax.plot(steps, smooth, label=f"{name} (final {sum(scores[-10:]) / 10:.2f})")[0]
        val = [(r["step"], r["val/score/mean"]) for r in rows if "val/score/mean" in r]
        ax.plot([v[0] for v in val], [v[1] for v in val], ls=":", marker="o", ms=3,
                color=line.get_color())  # fmt: skip
        windows = [sum(scores[i : i + 10]) / 10 for i in range(len(scores) - 9)]
        print(f"{name}: first 10 steps {windows[0]:.2f}, best 10 steps {max(windows):.2f}, "
              f"last 10 steps {windows[-1]:.2f}; greedy validation "
              f"{' '.join(f'{v:.2f}' for _, v in val)}")  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel("mean task reward (5-step moving average;\ndotted: greedy validation)")
    ax.set_title("Tiny policies learning built-in tasks on CPU (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "learning_curves.png")
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/novarl_learning")
