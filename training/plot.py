"""`llama-hybrid plot RUN_DIR --output loss.png`: loss curves from a Trainer run's `trainer_state.json`."""

from __future__ import annotations

import json
from pathlib import Path


def find_trainer_state(run_dir: str | Path) -> Path:
    """`RUN_DIR/trainer_state.json`, else the one in the newest `checkpoint-*` folder."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name.endswith(".json"):
        return run_dir
    direct = run_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    checkpoints = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(f"no trainer_state.json in {run_dir} or its checkpoint-* folders (is it a Trainer run?)")


def loss_curves(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for key in ("loss", "eval_loss"):
            if key in entry and "step" in entry:
                steps, values = curves.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(float(entry[key]))
    return curves


def plot_run(run_dir: str | Path, output: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    state_path = find_trainer_state(run_dir)
    curves = loss_curves(json.loads(state_path.read_text(encoding="utf-8"))["log_history"])
    if not curves:
        raise ValueError(f"{state_path} has no logged loss (set --logging_steps lower than the number of steps)")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in curves.items():
        ax.plot(
            steps, values, marker="o" if len(steps) < 30 else None, label={"loss": "train", "eval_loss": "eval"}[key]
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or str(Path(run_dir).name))
    ax.grid(alpha=0.3)
    ax.legend()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
