"""The one table of passes: recipe ``type`` name -> pass class, grouped by stage.

Add a pass by writing its file under prune/, quantize/ or encode/ and adding one line here.
"""

from __future__ import annotations

from modelpress.compressors.encode.entropy import EntropyEncode
from modelpress.compressors.pipeline import EncodePass, Pass, Stage
from modelpress.compressors.prune.admm import ADMMPrune
from modelpress.compressors.prune.lowrank import LowRankFactorize
from modelpress.compressors.prune.magnitude import MagnitudePrune
from modelpress.compressors.prune.recover import Recover, RecoverQuantized
from modelpress.compressors.prune.sparsegpt import SparseGPTPrune
from modelpress.compressors.prune.structured import StructuredPrune
from modelpress.compressors.prune.wanda import WandaPrune
from modelpress.compressors.quantize.fp16 import Fp16Quantize
from modelpress.compressors.quantize.int4 import Int4Quantize
from modelpress.compressors.quantize.int8 import Int8Quantize
from modelpress.compressors.quantize.kmeans import KMeansQuantize
from modelpress.compressors.quantize.mixed import MixedQuantize
from modelpress.compressors.quantize.sparse_storage import SparseStorage

_TABLE: list[type[Pass] | type[EncodePass]] = [
    MagnitudePrune,
    SparseGPTPrune,
    ADMMPrune,
    WandaPrune,
    StructuredPrune,
    LowRankFactorize,
    Recover,
    RecoverQuantized,
    Int8Quantize,
    Int4Quantize,
    KMeansQuantize,
    Fp16Quantize,
    MixedQuantize,
    SparseStorage,
    EntropyEncode,
]


def _build(table: list) -> dict[Stage, dict[str, type]]:
    by_stage: dict[Stage, dict[str, type]] = {"prune": {}, "quantize": {}, "encode": {}}
    for cls in table:
        names = by_stage[cls.stage]
        if cls.name in names:
            raise RuntimeError(f"two passes are registered as {cls.stage}/{cls.name}")
        names[cls.name] = cls
    return by_stage


PASSES: dict[Stage, dict[str, type]] = _build(_TABLE)
