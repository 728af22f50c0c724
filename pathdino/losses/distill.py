"""Feature distillation from a headless encoder: cosine distance of the student's tokens to the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(student, teacher)`` over all leading positions (fp32); inputs [..., D] of equal shape."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"cosine_distance: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "project the student to the teacher's width and resample the patch grid first"
        )
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
