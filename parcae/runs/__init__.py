"""Run directories and checkpoints, in plain PyTorch (no Lightning): the one owner of where a run keeps its files
(``layout``), how a checkpoint is checked, found and loaded (``checkpoint``), how files are written without being
left half-written (``storage``), who may write (``lock``) and what a fit does with its run directory (``rundir``).
Training, evaluation, inference, interop and experiments all go through it.

    from parcae.runs import load_checkpoint
    run = load_checkpoint("checkpoints/debug/last.ckpt")     # or the run directory: its newest good checkpoint
    run.model, run.tokenizer, run.tokenizer_path, run.step
"""

from .checkpoint import (LIGHTNING_KEYS, PARCAE_KEY, PARCAE_STATE_KEYS, Found, LoadedRun, check_checkpoint,
                         check_same_model, find_checkpoint, lightning_checkpoint, load_checkpoint, newest_checkpoint,
                         newest_good_checkpoint, open_checkpoint, parcae_state, read_parcae_state, resume_checkpoint,
                         run_tokenizer)
from .errors import CheckpointError, RunDirError, RunLockedError, StorageError
from .layout import (CONFIG_FILE, IMPORT_RECORD, LAST_CHECKPOINT, TEST_LOOPS_CSV, TEST_LOOPS_FIT, TEST_LOOPS_FIT_PLOT,
                     TEST_LOOPS_JSON, TEST_LOOPS_PLOT, TOKENIZER_FILE, core_result, has_checkpoint,
                     is_sharded_checkpoint, lm_eval_result, perplexity_result, step_checkpoint_name)
from .lock import RunLock, release_held_locks
from .storage import (check_new_folder, copy_atomically, results_dir_for, save_atomically,
                      write_folder_atomically, write_text_atomically)

__all__ = [
    "LIGHTNING_KEYS", "PARCAE_KEY", "PARCAE_STATE_KEYS", "open_checkpoint", "parcae_state", "read_parcae_state",
    "CONFIG_FILE", "IMPORT_RECORD", "LAST_CHECKPOINT", "TEST_LOOPS_CSV", "TEST_LOOPS_FIT", "TEST_LOOPS_FIT_PLOT",
    "TEST_LOOPS_JSON", "TEST_LOOPS_PLOT", "TOKENIZER_FILE", "CheckpointError", "Found", "LoadedRun", "RunDirError",
    "RunLock", "RunLockedError", "StorageError", "check_checkpoint", "check_new_folder", "check_same_model",
    "copy_atomically", "core_result", "find_checkpoint", "has_checkpoint", "is_sharded_checkpoint",
    "lightning_checkpoint", "lm_eval_result", "load_checkpoint", "newest_checkpoint", "newest_good_checkpoint",
    "perplexity_result", "release_held_locks", "results_dir_for", "resume_checkpoint", "run_tokenizer",
    "save_atomically", "step_checkpoint_name", "write_folder_atomically", "write_text_atomically",
]
