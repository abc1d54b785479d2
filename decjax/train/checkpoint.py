"""Checkpoints: a thin wrapper over orbax's ``CheckpointManager``.

A checkpoint holds three items: ``state`` (the train state pytree), ``data`` (JSON: the
grain iterator position, the simulated clock, ...) and ``meta`` (a fingerprint of everything
that fixes the shapes: the model fields and the tokenizer). Restoring first reads ``meta``
and refuses a checkpoint made for another model, naming the fields that differ; an
unreadable checkpoint raises :class:`CheckpointError`. Either way nothing on disk is
touched, so a user can inspect it or point ``--workdir`` elsewhere.
"""

import pathlib

import orbax.checkpoint as ocp

from decjax.types import PyTree


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; it was left as it is on disk."""


class Checkpointer:
    """Saves and restores ``(state, extras)`` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, extras: dict, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(extras),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, abstract_state: PyTree, meta: dict) -> tuple[PyTree, dict]:
        """Restores ``step`` into the structure of ``abstract_state`` after checking ``meta``."""
        where = self.directory / str(step)
        try:
            saved_meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint {where} could not be read ({type(e).__name__}: {e}); it was left "
                "untouched. Use another --workdir, or move the checkpoint away to start over."
            ) from e
        mismatch = describe_mismatch(saved_meta, meta)
        if mismatch:
            raise CheckpointError(
                f"checkpoint {where} was made for a different model ({mismatch}); it was left "
                "untouched. Use another --workdir, or restore the original settings."
            )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {where} could not be restored ({type(e).__name__}: {e}); it was "
                "left untouched. Use another --workdir, or move the checkpoint away to start over."
            ) from e
        return restored.state, restored.data

    def wait(self) -> None:
        """Blocks until asynchronous saves have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def describe_mismatch(saved: dict, current: dict) -> str:
    """``"model.d_model: checkpoint 64, config 128; ..."`` for every differing field."""
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    return "; ".join(diffs)

