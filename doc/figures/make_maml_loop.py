"""Draw doc/figures/maml_loop.png: MAML's inner and outer loop, and where the meta-gradient flows.

    python doc/figures/make_maml_loop.py [output.png]

Pillow only. Uses DejaVu Sans when the system has it (for the Greek letters), else Pillow's own font.
"""
import os
import sys

from PIL import Image, ImageDraw, ImageFont

S = 2  # drawn at twice the size, then scaled down for smooth lines
W, H = 1800, 1000
INK = (30, 30, 30)
GREY = (120, 120, 120)
BLUE_FILL, BLUE_LINE = (222, 235, 250), (40, 90, 160)
STEP_FILL, STEP_LINE = (255, 244, 214), (170, 120, 20)
LOSS_FILL, LOSS_LINE = (238, 238, 238), (90, 90, 90)
RED = (200, 40, 40)
GREEN = (30, 140, 60)

FONT_PATHS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/DejaVuSans.ttf",
]
BOLD_PATHS = [p.replace("DejaVuSans.ttf", "DejaVuSans-Bold.ttf") for p in FONT_PATHS]


def font(size, bold=False):
    for path in BOLD_PATHS if bold else FONT_PATHS:
        if os.path.exists(path):
            return ImageFont.truetype(path, size * S)
    return ImageFont.load_default(size=size * S)


def P(*xy):
    """Scale figure coordinates to the supersampled canvas."""
    return tuple(int(round(v * S)) for v in xy)


class Fig:
    def __init__(self):
        self.img = Image.new("RGB", (W * S, H * S), "white")
        self.d = ImageDraw.Draw(self.img)

    # ----- text: a list of (text, kind) with kind "" normal, "_" subscript, "^" superscript
    def rich(self, x, y, parts, size=20, fill=INK, anchor="mm", bold=False):
        normal, small = font(size, bold), font(int(size * 0.68), bold)
        widths = [self.d.textlength(t, font=small if k else normal) / S for t, k in parts]
        total = sum(widths)
        left = {"m": x - total / 2, "l": x, "r": x - total}[anchor[0]]
        for (text, kind), width in zip(parts, widths):
            dy = {"": 0, "_": size * 0.32, "^": -size * 0.38}[kind]
            self.d.text(P(left, y + dy), text, font=small if kind else normal, fill=fill, anchor="lm")
            left += width
        return total

    def text(self, x, y, s, size=20, fill=INK, anchor="mm", bold=False):
        self.d.text(P(x, y), s, font=font(size, bold), fill=fill, anchor=anchor)

    def box(self, x0, y0, x1, y1, fill, line, width=2, radius=12, dash=False):
        self.d.rounded_rectangle(P(x0, y0, x1, y1), radius=radius * S, fill=fill, outline=line, width=width * S)

    def line(self, points, fill=INK, width=2, dash=None):
        pts = [P(*p) for p in points]
        if not dash:
            self.d.line(pts, fill=fill, width=width * S, joint="curve")
            return
        on, off = dash
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            length = ((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5
            ux, uy = (xb - xa) / length, (yb - ya) / length
            pos = 0.0
            while pos < length:
                end = min(pos + on * S, length)
                self.d.line([(xa + ux * pos, ya + uy * pos), (xa + ux * end, ya + uy * end)],
                            fill=fill, width=width * S)
                pos = end + off * S

    def arrow(self, points, fill=INK, width=2, dash=None, head=13):
        self.line(points, fill, width, dash)
        (xa, ya), (xb, yb) = points[-2], points[-1]
        length = ((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5
        ux, uy = (xb - xa) / length, (yb - ya) / length
        px, py = -uy, ux
        tip = (xb, yb)
        left = (xb - ux * head + px * head * 0.5, yb - uy * head + py * head * 0.5)
        right = (xb - ux * head - px * head * 0.5, yb - uy * head - py * head * 0.5)
        self.d.polygon([P(*tip), P(*left), P(*right)], fill=fill)

    def save(self, path):
        self.img.resize((W, H), Image.LANCZOS).save(path, optimize=True)


def theta_t(k):
    return [("θ", ""), ("t", "_"), (f"({k})", "^")]


def task_row(f, y, task, label_paths):
    """One task's inner loop at height y (centre of its boxes)."""
    # the task's copy of the meta-parameters
    f.box(330, y - 38, 430, y + 38, BLUE_FILL, BLUE_LINE)
    f.rich(380, y - 8, theta_t(0), 24)
    f.text(380, y + 22, "= θ", 17, GREY)
    f.text(330, y - 56, f"task {task}", 18, INK, anchor="lm", bold=True)
    f.arrow([(260, 500), (295, 500), (295, y), (328, y)], INK)

    # inner SGD steps
    steps = [(470, "step 1", theta_t(1)), (740, "step K", theta_t("K"))]
    for i, (x0, name, after) in enumerate(steps):
        f.box(x0, y - 46, x0 + 190, y + 46, STEP_FILL, STEP_LINE)
        f.text(x0 + 95, y - 22, f"SGD {name}", 19, bold=True)
        f.rich(x0 + 95, y + 4, [("on support set S", ""), ("t", "_")], 17)
        f.rich(x0 + 95, y + 28, [("θ ← θ − α ∇L", ""), ("S", "_")], 17)
        x_prev = 430 if i == 0 else 705
        f.arrow([(x_prev, y), (x0 - 2, y)])
        if i == 0:
            f.rich(690, y - 12, after, 22)
            f.line([(660, y), (720, y)], GREY, 2, dash=(5, 5))
            f.text(690, y + 18, "…", 22, GREY)
    f.box(965, y - 38, 1065, y + 38, BLUE_FILL, BLUE_LINE)
    f.rich(1015, y, theta_t("K"), 24)
    f.arrow([(930, y), (963, y)])

    # query loss of the adapted parameters
    f.box(1105, y - 42, 1345, y + 42, LOSS_FILL, LOSS_LINE)
    f.rich(1225, y - 14, [("query loss L", ""), ("Q,t", "_")], 19, bold=True)
    f.rich(1225, y + 16, [("on query set Q", ""), ("t", "_")], 17)
    f.arrow([(1065, y), (1103, y)])
    f.arrow([(1345, y), (1420, y), (1420, 500), (1478, 500)])

    # second order: back through every inner step (red, below the row)
    yb = y + 88
    f.line([(1225, y + 42), (1225, yb), (380, yb)], RED, 3, dash=(14, 8))
    f.arrow([(380, yb), (380, y + 40)], RED, 3)
    for x in (565, 835):  # it passes through each step: the arrowheads point back along the path
        f.arrow([(x + 60, yb), (x - 20, yb)], RED, 3, head=14)
        f.line([(x, yb), (x, y + 46)], RED, 3)
    # first order: straight to θ, past the inner steps (green, above the row)
    ya = y - 80
    f.arrow([(1185, y - 42), (1185, ya), (418, ya), (418, y - 40)], GREEN, 3, dash=(14, 8))
    if label_paths:
        f.text(815, yb + 22, "first_order: False — meta-gradient flows back through every inner step "
               "(second derivatives of the support loss)", 17, RED)
        f.text(770, ya - 18, "first_order: True — query-loss gradient at the adapted parameters, "
               "passed straight back (inner gradients treated as constants)", 17, GREEN)


def main(out):
    f = Fig()
    f.text(W / 2, 34, "MAML: an inner loop per task, an outer loop over the meta-batch", 28, bold=True)

    # meta-parameters
    f.box(40, 430, 260, 570, BLUE_FILL, BLUE_LINE, width=3)
    f.text(150, 465, "meta-parameters", 19, bold=True)
    f.text(150, 505, "θ", 34)
    f.text(150, 545, "(model.parameters())", 15, GREY)

    task_row(f, 290, 1, True)
    f.text(380, 500, "⋮", 34, GREY)
    f.rich(470, 500, [("one copy θ", ""), ("t", "_"), (" of θ per task; all T tasks run at once (stacked on channels)", "")],
           17, GREY, anchor="lm")
    f.rich(470, 528, [("θ", ""), ("t", "_"), ("(0)", "^"), (" = θ for every t, so the gradients that reach the copies add up in ∇", ""),
                      ("θ", "_"), ("L", "")], 17, GREY, anchor="lm")
    task_row(f, 740, "T", False)

    # mean over tasks
    f.box(1480, 440, 1760, 560, LOSS_FILL, LOSS_LINE, width=3)
    f.rich(1620, 470, [("L(θ) = mean", ""), ("t", "_"), (" L", ""), ("Q,t", "_")], 21, bold=True)
    f.text(1620, 505, "mean query loss", 17)
    f.text(1620, 532, "over the meta-batch", 17)

    # outer step, back to θ
    f.box(1480, 140, 1760, 250, BLUE_FILL, BLUE_LINE, width=3)
    f.text(1620, 168, "outer step", 19, bold=True)
    f.text(1620, 196, "meta_optimizer (Adam)", 17)
    f.rich(1620, 224, [("θ ← Adam(θ, ∇", ""), ("θ", "_"), ("L)", "")], 17)
    f.arrow([(1620, 438), (1620, 252)], RED, 3)
    f.rich(1632, 352, [("∇", ""), ("θ", "_"), ("L", "")], 20, RED, anchor="lm")
    f.text(1632, 384, "meta-gradient", 17, RED, anchor="lm")
    f.arrow([(1620, 140), (1620, 100), (150, 100), (150, 428)], BLUE_LINE, 3)
    f.text(820, 84, "outer loop: next meta-batch of T tasks starts from the updated θ", 18, BLUE_LINE)

    # legend
    y = 915
    f.line([(60, y), (110, y)], INK, 2)
    f.text(120, y, "forward", 17, anchor="lm")
    f.line([(230, y), (280, y)], RED, 3, dash=(14, 8))
    f.text(290, y, "second-order meta-gradient (default)", 17, RED, anchor="lm")
    f.line([(660, y), (710, y)], GREEN, 3, dash=(14, 8))
    f.text(720, y, "first-order (FOMAML) meta-gradient", 17, GREEN, anchor="lm")
    f.text(60, y + 42, "K = update_step,  α = base_optimizer.learning_rate,  T = train_batch_size,  "
           "Adam learning rate = meta_optimizer.learning_rate", 17, GREY, anchor="lm")
    f.save(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "maml_loop.png"))
