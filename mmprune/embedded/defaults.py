"""The embedded defaults of one model family (LLaVA-NeXT, VideoLLaMA2-AV): which checkpoint
EMBEDDED_MODEL=smol|tiny picks, how reports and results name it, and the banner of a run that
falls back to it because the real checkpoint is absent. Each model tree's `embedded/paths.py`
builds one `EmbeddedModels` from its own folders and words; the rules live here once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def repo_relative(path, repo_root: Path) -> str:
    """`path` relative to the repository when inside it (for committed reports), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(repo_root)) if resolved.is_relative_to(repo_root) else str(path)


@dataclass(frozen=True)
class EmbeddedModels:
    repo_root: Path
    checkpoints: dict  # "smol" / "tiny" -> checkpoint folder
    names: dict  # choice -> how the banner names the model
    titles: dict  # choice -> how docs/results.md names the model of a section
    assemble_smol: Callable[[], None]  # builds the smol checkpoint when it is missing or stale
    real_model: str  # the public scripts' real checkpoint, relative to the repository root

    def choice(self) -> str:
        """"smol" or "tiny", from $EMBEDDED_MODEL (default smol; one choice for both trees)."""
        from mmprune.embedded.smollm2 import embedded_choice

        return embedded_choice()

    def default_checkpoint(self) -> Path:
        """The checkpoint $EMBEDDED_MODEL names; the smol one is assembled first if needed."""
        choice = self.choice()
        if choice == "smol":
            self.assemble_smol()
        return self.checkpoints[choice]

    def which(self, model_path) -> str | None:
        """"smol" / "tiny" when `model_path` is that embedded checkpoint, else None."""
        target = os.path.realpath(model_path)
        return next((name for name, path in self.checkpoints.items() if os.path.realpath(path) == target), None)

    def is_embedded(self, model_path) -> bool:
        return self.which(model_path) is not None

    def is_tiny(self, model_path) -> bool:
        return self.which(model_path) == "tiny"

    def results_suffix(self, model_path) -> str:
        """Results of the tiny model are kept beside the default's: "_tiny" in file and section names."""
        return "_tiny" if self.is_tiny(model_path) else ""

    def model_title(self, model_path) -> str:
        which = self.which(model_path)
        return self.titles[which] if which else f"`{self.shown(model_path)}`"

    def shown(self, path) -> str:
        return repo_relative(path, self.repo_root)

    def resolve_model(self, args, notes: list) -> bool:
        """Fill args.model_path: the real checkpoint when it exists, else the embedded one (a line
        for the banner goes to `notes`). Returns whether the model is an embedded one."""
        if args.model_path is None:
            if os.path.isdir(self.real_model):
                args.model_path = self.real_model
            else:
                args.model_path = str(self.default_checkpoint())
                notes.append(f"model: {self.real_model} not found -> EMBEDDED {self.names[self.choice()]} "
                             f"{self.shown(args.model_path)}")
        return self.is_embedded(args.model_path)


def announce(notes: list, path_options: str) -> None:
    """The loud banner of a run on the embedded default (nothing when `notes` is empty);
    `path_options` names the flags that point a run at real files."""
    from mmprune.base.entry import banner

    if notes:
        banner(["RUNNING ON THE EMBEDDED DEFAULT (small model / synthetic data, for trying the pipeline)"] + notes
               + [f"Set {path_options} for a real checkpoint."])
