"""Draw doc/figures/maml_loop.png with matplotlib: MAML's inner and outer loop, and where the meta-gradient flows.

    python doc/figures/make_maml_loop.py [output.png]          (pip install -e ".[plot]")
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

BLUE, BLUE_FILL = "#285aa0", "#deebfa"
STEP, STEP_FILL = "#aa7814", "#fff4d6"
LOSS, LOSS_FILL = "#5a5a5a", "#eeeeee"
RED, GREEN, GREY = "#c82828", "#1e8c3c", "#787878"


def box(ax, x, y, w, h, lines, edge, fill, size=13):
    """A rounded box centred on (x, y); lines[0] is bold."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=8",
                                ec=edge, fc=fill, lw=2))
    for i, line in enumerate(lines):
        ax.text(x, y + (i - (len(lines) - 1) / 2) * 24, line, ha="center", va="center",
                fontsize=size if i == 0 else size - 2, weight="bold" if i == 0 else "normal")


def arrow(ax, points, color="black", style="-", head=True):
    """A polyline through `points`, with an arrow head on its last segment."""
    xs, ys = zip(*points)
    ax.plot(xs[:-1] if head else xs, ys[:-1] if head else ys, color=color, ls=style, lw=2)
    if head:
        ax.annotate("", xy=points[-1], xytext=points[-2],
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=2, ls=style, mutation_scale=18))


def task_row(ax, y, name):
    ax.text(330, y - 55, name, fontsize=12, weight="bold")
    box(ax, 380, y, 100, 74, [r"$\theta_t^{(0)}$", r"$= \theta$"], BLUE, BLUE_FILL, 15)
    box(ax, 600, y, 190, 90, ["SGD step 1", r"on support set $S_t$", r"$\theta \leftarrow \theta - \alpha\nabla L_S$"],
        STEP, STEP_FILL)
    box(ax, 870, y, 190, 90, ["SGD step K", r"on support set $S_t$", r"$\theta \leftarrow \theta - \alpha\nabla L_S$"],
        STEP, STEP_FILL)
    box(ax, 1040, y, 100, 74, [r"$\theta_t^{(K)}$"], BLUE, BLUE_FILL, 15)
    box(ax, 1235, y, 240, 80, [r"query loss $L_{Q,t}$", r"on query set $Q_t$"], LOSS, LOSS_FILL)
    for x0, x1 in ((430, 505), (965, 990), (1090, 1115)):
        arrow(ax, [(x0, y), (x1, y)])
    arrow(ax, [(695, y), (775, y)], GREY, "--")
    ax.text(735, y - 14, r"$\theta_t^{(1)}$  ...", ha="center", fontsize=12)
    arrow(ax, [(1190, y - 40), (1190, y - 80), (420, y - 80), (420, y - 40)], GREEN, "--")
    arrow(ax, [(1230, y + 40), (1230, y + 85), (380, y + 85), (380, y + 37)], RED, "--")
    for x in (565, 835):
        ax.plot([x, x], [y + 45, y + 85], color=RED, lw=2)


def main(output):
    fig = plt.figure(figsize=(18, 10), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1], xlim=(0, 1800), ylim=(1000, 0))
    ax.axis("off")
    ax.text(900, 35, "MAML: an inner loop per task, an outer loop over the meta-batch", ha="center", fontsize=20,
            weight="bold")
    box(ax, 150, 500, 215, 135, ["meta-parameters", r"$\theta$", "(model.parameters())"], BLUE, BLUE_FILL, 15)
    box(ax, 1620, 195, 275, 105, ["outer step", "meta_optimizer (Adam)", r"$\theta \leftarrow$ Adam$(\theta, \nabla_\theta L)$"],
        BLUE, BLUE_FILL, 14)
    box(ax, 1620, 500, 275, 115, [r"$L(\theta)$ = mean$_t\ L_{Q,t}$", "mean query loss", "over the meta-batch"],
        LOSS, LOSS_FILL, 14)
    for y, name in ((290, "task 1"), (740, "task T")):
        task_row(ax, y, name)
        arrow(ax, [(258, 500), (295, 500), (295, y), (330, y)])
        arrow(ax, [(1355, y), (1420, y), (1420, 500), (1482, 500)])
    arrow(ax, [(1620, 442), (1620, 248)], RED)
    ax.text(1632, 365, r"$\nabla_\theta L$" + "\nmeta-gradient", color=RED, fontsize=13, va="center")
    arrow(ax, [(1620, 142), (1620, 100), (150, 100), (150, 432)], BLUE)
    ax.text(820, 85, r"outer loop: next meta-batch of T tasks starts from the updated $\theta$", color=BLUE,
            fontsize=13, ha="center")
    ax.text(330, 195, "first_order: True: query-loss gradient at the adapted parameters, passed straight back "
            "(inner gradients treated as constants)", color=GREEN, fontsize=12)
    ax.text(340, 400, "first_order: False: the meta-gradient flows back through every inner step "
            "(second derivatives of the support loss)", color=RED, fontsize=12)
    ax.text(470, 515, "one copy $\\theta_t$ of $\\theta$ per task; all T tasks run at once (stacked on channels)\n"
            "$\\theta_t^{(0)} = \\theta$ for every t, so the gradients that reach the copies add up in "
            "$\\nabla_\\theta L$", color=GREY, fontsize=12, va="center", linespacing=1.8)
    legend = [("black", "-", "forward"), (RED, "--", "second-order meta-gradient (default)"),
              (GREEN, "--", "first-order (FOMAML) meta-gradient")]
    for x, (color, style, label) in zip((60, 230, 660), legend):
        ax.plot([x, x + 50], [915, 915], color=color, ls=style, lw=2)
        ax.text(x + 60, 915, label, color=color, fontsize=12, va="center")
    ax.text(60, 958, r"K = update_step,  $\alpha$ = base_optimizer.learning_rate,  T = train_batch_size,  "
            "Adam learning rate = meta_optimizer.learning_rate", color=GREY, fontsize=12, va="center")
    fig.savefig(output)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "doc/figures/maml_loop.png")
