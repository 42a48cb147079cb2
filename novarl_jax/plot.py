"""Training curves: ``python -m novarl_jax.plot WORKDIR`` writes ``WORKDIR/plots/training.png``
(``--out=DIR``: ``DIR/training.png``).

Reads ``WORKDIR/metrics.jsonl`` and draws reward, KL, entropy and loss curves (whichever of
them the run logged). Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import os
import sys

# (title, candidate metric names; the first present is drawn)
PANELS = (
    ("reward", ("critic/score/mean",)),
    ("validation score", ("val/score/mean",)),
    # GRPO's KL loss term, and PPO's KL penalty in the rewards (a run may log both).
    ("KL to reference", ("actor/kl_loss",)),
    ("KL to reference in the reward", ("actor/reward_kl_penalty",)),
    # Not a KL to the reference: how far each update moved the policy from the sampling one.
    ("KL to the sampling policy", ("actor/ppo_kl",)),
    ("entropy", ("actor/entropy",)),
    ("policy loss", ("actor/pg_loss",)),
    ("value loss", ("critic/vf_loss",)),
    ("dropped fraction", ("moe/dropped_fraction",)),
)


_COLUMNS = 4  # panels per row of the figure


def choose_panels(rows: list[dict]) -> list[tuple[str, str]]:
    """(title, metric) of each panel to draw: the first candidate of each that ``rows`` log."""
    panels = []
    for title, names in PANELS:
        name = next(
            (n for n in names if any(isinstance(r.get(n), int | float) for r in rows)), None
        )
        if name is not None:
            panels.append((title, name))
    return panels


def plot_training(workdir: str, out_dir: str | None = None) -> str:
    """Writes the training curves of ``workdir`` as ``training.png`` in ``out_dir`` (default
    ``workdir/plots``) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from novarl_jax.trainer.metrics import read_metrics

    rows = read_metrics(workdir)
    if not rows:
        raise ValueError(f"{os.path.join(workdir, 'metrics.jsonl')} has no rows to plot")
    panels = choose_panels(rows)
    if not panels:
        raise ValueError(
            f"{os.path.join(workdir, 'metrics.jsonl')} has no finite value of any plotted "
            "metric (score, KL, entropy, losses)"
        )
    from matplotlib.ticker import MaxNLocator

    columns = min(len(panels), _COLUMNS)
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows_of_panels, columns, figsize=(4 * columns, 3.2 * rows_of_panels), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, name) in zip(axes.flat, panels, strict=False):
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(f"{title}\n({name})", fontsize=9)
        ax.set_xlabel("step")
        # Steps, not 1.5 (one tick is enough: a panel may have a single point).
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_dir = os.path.join(workdir, "plots") if out_dir is None else out_dir
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


USAGE = (
    "usage: python -m novarl_jax.plot WORKDIR [--out=DIR]\n"
    "Draws WORKDIR/metrics.jsonl (a training run's directory) into WORKDIR/plots/training.png,\n"
    "or DIR/training.png with --out (a workdir this user cannot write)."
)


def main(argv: list[str]) -> int:
    args = argv[1:]
    if len(args) == 1 and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    outs = [a.split("=", 1)[1] for a in args if a.startswith("--out=")]
    rest = [a for a in args if not a.startswith("--out=")]
    if len(rest) != 1 or rest[0].startswith("-") or len(outs) > 1 or "" in outs:
        print(USAGE.splitlines()[0], file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401 - only its absence is reported as one line
    except ImportError:
        print(
            "novarl_jax.plot: error: matplotlib is not installed; pip install -e '.[plot]'",
            file=sys.stderr,
        )
        return 2
    try:
        print(plot_training(rest[0], outs[0] if outs else None))
    except ValueError as e:
        print(f"novarl_jax.plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing workdir, or a file where a directory belongs (or back)
        what = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        if isinstance(e, PermissionError) and not outs:
            what += "; pass --out=DIR to write the plot elsewhere"
        print(f"novarl_jax.plot: error: {what}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
