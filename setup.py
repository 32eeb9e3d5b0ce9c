"""Install the dependencies of the MAML trainer (the repository itself runs in place: tools/, models/)."""
from setuptools import setup


def requirements():
    with open("requirements.txt") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


setup(
    name="paddle-maml-trainer",
    version="0.1.0",
    description="Config-driven, exact second-order MAML for PaddlePaddle (PaddleRec-compatible layout)",
    python_requires=">=3.8",
    install_requires=requirements(),
    # Optional: runner.use_visual (VisualDL scalars, as PaddleRec) and tools/plot_metrics.py (matplotlib).
    # The tests cover both extras and run PaddleRec's own tools (../shared/reference/paddlerec), which import six.
    extras_require={"test": ["pytest", "hypothesis", "visualdl", "matplotlib", "six"], "visual": ["visualdl"], "plot": ["matplotlib"]},
    packages=[],
)
