"""The study directory: one atomic directory per finished trial, assembled tables on top.

    OUT/study.json              the validated config and its fingerprints
    OUT/trials/<trial_id>/      sequences/tokens/changes.parquet + info.json
    OUT/preflight.json          the preflight's checks and the defaults it filled in
    OUT/events.jsonl            the event log (logs.py): one JSON object per line
    OUT/{sequences,tokens,changes}.parquet, summary.json, log_history.json, report.md, plots/

A trial is written into ``trials/.<id>.tmp-<pid>`` and renamed into place (core/io.py),
so after a kill -9 a trial is either complete or absent (leftover temp dirs are removed on
the next open). The assembled tables are always rebuilt from the trial directories in plan
order, so an interrupted-and-resumed study gives the same tables as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from ..core.errors import StepprobeError
from ..core.io import atomic_dir, write_json, write_parquet
from .config import StudyConfig
from .plan import Trial
from .trial import TABLES, TrialResult


class Store:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.trials_dir = self.out / "trials"

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, out: str | os.PathLike, config: StudyConfig, force: bool = False) -> Store:
        """Create OUT, or reopen it for the same config.

        A different config is refused unless ``force`` or no trial has finished yet; with force
        the new config is recorded and finished trials whose results it would change are
        deleted (trials it would compute identically, e.g. when only repeats were added, are
        kept).
        """
        store = cls(Path(out))
        meta_path = store.out / "study.json"
        new = {
            "config": config.model_dump(mode="json"),
            "fingerprint": config.fingerprint(),
            "trial_fingerprint": config.trial_fingerprint(),
        }
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise StepprobeError(f"{meta_path}: unreadable study record ({e})") from None
            # a study without a finished trial has nothing to protect: adopt the new config
            if old.get("fingerprint") != new["fingerprint"] and not force and store.finished():
                changed = _changed_keys(old.get("config", {}), new["config"])
                raise StepprobeError(
                    f"{store.out} holds a study with a different config (changed: {', '.join(changed) or 'unknown'}); "
                    "use another --out, or pass --force to adopt the new config "
                    "(finished trials it would compute differently are deleted)"
                )
        elif store.out.exists() and any(store.out.iterdir()):
            raise StepprobeError(
                f"{store.out} exists and is not a stepprobe study directory (no study.json); choose an empty or new --out"
            )
        store.trials_dir.mkdir(parents=True, exist_ok=True)
        for tmp in [*store.trials_dir.glob(".*.tmp-*"), *store.trials_dir.glob(".tmp-*")]:
            shutil.rmtree(tmp, ignore_errors=True)  # a write killed half-way
        for tmp in store.out.glob(".*.tmp-*"):  # an assembled table or json killed half-way
            tmp.unlink(missing_ok=True)
        if force:
            for d in store.finished():
                if store._fingerprint(d) != new["trial_fingerprint"]:
                    shutil.rmtree(store.trials_dir / d)
        write_json(meta_path, new)
        return store

    # ------------------------------------------------------------------ trials
    def _fingerprint(self, trial_id: str) -> str | None:
        try:
            return json.loads((self.trials_dir / trial_id / "info.json").read_text())["fingerprint"]
        except (OSError, KeyError, json.JSONDecodeError):
            return None

    def finished(self) -> set[str]:
        if not self.trials_dir.exists():
            return set()
        return {
            d.name for d in self.trials_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
        }

    def write_trial(self, trial: Trial, result: TrialResult) -> Path:
        final = self.trials_dir / trial.trial_id
        if final.exists():  # a duplicate delivery (a retried trial): results are identical
            return final
        info = {
            "trial_id": trial.trial_id,
            "checkpoint": trial.checkpoint,
            "repeat": trial.repeat,
            "update_seed": trial.update_seed,
            "eval_seed": trial.eval_seed,
            "fingerprint": trial.fingerprint,
            "info": result.info,
            "timings": result.timings,
        }
        with atomic_dir(final, fsync=True) as tmp:
            for name in TABLES:  # a body may leave out tables it has no rows for (removal)
                result.tables.get(name, pd.DataFrame()).to_parquet(
                    tmp / f"{name}.parquet", index=False
                )
            (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        return final

    def read_info(self, trial_id: str) -> dict:
        return json.loads((self.trials_dir / trial_id / "info.json").read_text())

    def read_table(self, trial_id: str, name: str) -> pd.DataFrame:
        f = self.trials_dir / trial_id / f"{name}.parquet"
        if name == "removal" and not f.exists():  # a trial written before the removal table
            return pd.DataFrame()
        return pd.read_parquet(f)

    # ------------------------------------------------------------------ assembly
    def assemble(self, trials: list[Trial]) -> dict[str, pd.DataFrame]:
        """Concatenate finished trials' tables in plan order and write them atomically."""
        done = self.finished()
        ids = [t.trial_id for t in trials if t.trial_id in done]
        out = {}
        for name in TABLES:
            parts = [self.read_table(i, name) for i in ids]
            parts = [p for p in parts if len(p)] or parts[:1]
            df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
            write_parquet(self.out / f"{name}.parquet", df)
            out[name] = df
        return out


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
