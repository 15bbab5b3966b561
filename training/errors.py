"""The classes of anticipated failure of ``hf-fusion``, each with its own exit status.

``training.cli.main`` prints any of them as one line (``hf-fusion COMMAND: error: ...``) and exits
with the class's status; anything unanticipated keeps its traceback (exit status 1). The table is
in ``docs/guarantees.md``:

====  =======================================================================================
 2    bad options or experiment file (unknown key, wrong value, invalid config or generation
      settings, a length the model cannot hold) -- also any plain ``ValueError``
 3    bad data: a file that is missing, a folder, empty, not UTF-8, or malformed (names the
      file and the line)
 4    the output folder is in use by another run (names the holder's pid and host)
 5    resuming is impossible or unsafe: no complete checkpoint, or the data / tokenizer
      changed since the run started
 6    the system lacks something the set-up script installs (e.g. a built-in corpus's
      Debian package); the message gives the command
 7    a model or tokenizer that cannot be loaded (no such folder, not a model folder), or a
      tokenizer that does not fit the model
 8    the file system refused a write (disk full, permission denied); names the path
130   interrupted (Ctrl-C); a run with checkpoints resumes with ``--resume_from_checkpoint true``
====  =======================================================================================
"""

from __future__ import annotations


class HfFusionError(Exception):
    """An anticipated failure: reported as one line, exit status ``exit_code``."""

    exit_code = 1


class UsageError(HfFusionError, ValueError):
    """Bad options or experiment file."""

    exit_code = 2


class DataError(HfFusionError, ValueError):
    """A data file that cannot be read as parallel text."""

    exit_code = 3


class OutputDirBusyError(HfFusionError):
    """Another run holds the output folder's lock."""

    exit_code = 4


class ResumeError(HfFusionError, ValueError):
    """A run that cannot (safely) continue from its checkpoints."""

    exit_code = 5


class SetupError(HfFusionError, RuntimeError):
    """Something the set-up script installs is missing."""

    exit_code = 6


class ModelLoadError(HfFusionError, ValueError):
    """A model or tokenizer that cannot be loaded or does not fit."""

    exit_code = 7


EXIT_USAGE = UsageError.exit_code
EXIT_DATA = DataError.exit_code
EXIT_BUSY = OutputDirBusyError.exit_code
EXIT_RESUME = ResumeError.exit_code
EXIT_SETUP = SetupError.exit_code
EXIT_MODEL = ModelLoadError.exit_code
EXIT_FILESYSTEM = 8
EXIT_INTERRUPTED = 130
