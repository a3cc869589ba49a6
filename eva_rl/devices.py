"""Device selection: `"auto"` means CUDA when present."""

from __future__ import annotations

import torch


def get_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else CPU; anything else is passed to ``torch.device``.

    :raises ValueError: for a device string torch does not know, or CUDA requested where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use 'auto' or 'cpu'")
    return resolved
