"""Readable references: the study's three BatchNorm variants (section 3 of the seed report).
The C++ and CUDA kernels are tested against these and against torch."""
from fastbn.reference.batch_norm import (
    CustomBatchNormAutograd,
    CustomBatchNormManualFunction,
    CustomBatchNormManualModule,
)

__all__ = ["CustomBatchNormAutograd", "CustomBatchNormManualFunction", "CustomBatchNormManualModule"]
