"""runner.use_visual: VisualDL scalars where PaddleRec's tools write them.

PaddleRec writes <config folder>/visualDL_log/train (tags train/<name>) and
visualDL_log/infer (infer/<name>) at every print interval; so do these tools,
with every logged number (loss, metrics, print_dict values). VisualDL is an
optional extra: pip install -e ".[visual]".
"""
import numbers
import os


class VisualLog:
    """Scalars of one phase ("train" or "infer") through a visualdl.LogWriter."""

    def __init__(self, writer, phase):
        self.writer, self.phase = writer, phase

    def add(self, values, step):
        for key, value in values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(tag=f"{self.phase}/{key}", step=int(step), value=float(value))

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_visual_log(config, phase, is_main=True):
    """A VisualLog when runner.use_visual is on (rank 0 only), else None; a missing visualdl is a UserError."""
    if not config.get("runner.use_visual") or not is_main:
        return None
    try:
        from visualdl import LogWriter
    except ImportError:
        raise config.error("runner.use_visual", 'needs the optional package visualdl: pip install -e ".[visual]" '
                           "(or pip install visualdl)") from None
    return VisualLog(LogWriter(logdir=os.path.join(config.config_dir, "visualDL_log", phase)), phase)
