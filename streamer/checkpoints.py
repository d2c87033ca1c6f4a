"""Model checkpoints on disk: atomic writes, newest-first loading with fallback, pruning."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

from drnn_core.config import ModelConfig
from drnn_core.errors import ModelFormatError, ModelShapeError
from drnn_core.model import RecurrentBPR
from streamer.errors import CheckpointError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^model-(\d{20})-(\d+)\.npz$")


class CheckpointStore:
    """Writes and reads ``model-<time_ns>-<events>.npz`` files in one directory.

    Parameters
    ----------
    directory : str or Path
        Created if missing.
    kept : int
        Number of newest checkpoints to keep; older ones are deleted after a write.
    """

    def __init__(self, directory: str | os.PathLike, kept: int = 3) -> None:
        self.directory = Path(directory)
        self.kept = kept

    def paths(self) -> list[Path]:
        """Return the checkpoint files, newest first."""
        if not self.directory.is_dir():
            return []
        named = [(path, _NAME.match(path.name)) for path in self.directory.iterdir()]
        ordered = sorted((match.group(1), path) for path, match in named if match)
        return [path for _, path in reversed(ordered)]

    def check_writable(self) -> None:
        """Create the directory and write and delete a probe file in it.

        Raises
        ------
        CheckpointError
            If that fails, so a bad checkpoint_dir stops the worker at start,
            not at its first checkpoint.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-"):
                pass
        except OSError as exc:
            raise CheckpointError(
                f"Invalid checkpoint_dir={str(self.directory)!r}: cannot write there ({exc}). "
                "Point --checkpoint-dir / DRNN_CHECKPOINT_DIR to a writable directory."
            ) from exc

    def save(self, model: RecurrentBPR, events_applied: int) -> Path:
        """Write the model atomically (temporary file, fsync, rename), then prune old files.

        Raises
        ------
        CheckpointError
            If the directory cannot be created or written.
        """
        started = time.monotonic()
        path = self.directory / f"model-{time.time_ns():020d}-{events_applied}.npz"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, model.to_bytes())
        except OSError as exc:
            raise CheckpointError(
                f"Failed to write checkpoint {path}: {exc}. Check that checkpoint_dir is writable and has space."
            ) from exc
        logger.info(
            "Wrote checkpoint %s (%d known items, %.0f ms)",
            path, model.known_items, 1000 * (time.monotonic() - started),
        )
        self._prune()
        return path

    def load_newest(self, config: ModelConfig) -> tuple[RecurrentBPR, Path] | None:
        """Load the newest readable checkpoint, falling back to older ones; None if there is none.

        A damaged file is logged at ERROR and skipped. A checkpoint whose h or K
        differ from ``config`` raises, since falling back would silently drop it.

        Raises
        ------
        CheckpointError
            If a checkpoint has another hidden_size or window than the settings,
            or if every checkpoint is damaged (a new model would silently
            replace the trained one).
        """
        damaged = []
        for path in self.paths():
            try:
                model = RecurrentBPR.from_bytes(path.read_bytes(), config)
            except ModelShapeError as exc:
                raise CheckpointError(f"Checkpoint {path} does not fit the settings: {exc}") from exc
            except (ModelFormatError, OSError) as exc:
                logger.error("Skipping damaged checkpoint %s: %s", path, exc)
                damaged.append(path)
                continue
            logger.info("Loaded checkpoint %s (%d known items)", path, model.known_items)
            return model, path
        if damaged:
            raise CheckpointError(
                f"No readable checkpoint in {self.directory}: all {len(damaged)} are damaged. "
                "Move them away to start a new model, or restore a good checkpoint."
            )
        return None

    def _prune(self) -> None:
        for path in self.paths()[self.kept:]:
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("Failed to delete old checkpoint %s: %s", path, exc)


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
