"""Each Protocol of fedrun/core.py against the classes that implement it, checked by mypy.

`make lint` type-checks this file ([tool.mypy] files in pyproject.toml); nothing runs it, and
pytest does not collect it. Protocols are structural: a class that loses a method or changes
a signature no longer satisfies its Protocol, and mypy names the class and the member at its
`yield` here. A new implementation gets a parameter and a `yield` in its Protocol's function.
"""
from collections.abc import Iterator

from fedrun.attacks import ModelPoisoning, NoAttack
from fedrun.backends.process import ProcessBackend
from fedrun.backends.ray import RayBackend
from fedrun.backends.sequential import SequentialBackend
from fedrun.backends.vectorized import VectorizedBackend
from fedrun.compression import NoCompression, StochasticQuantizer, TopK
from fedrun.core import Backend, ClientHook, LocalRule, Mechanism, Sampler, ServerModel, StatefulHook, Strategy
from fedrun.privacy.central import CentralPrivacy
from fedrun.privacy.local import LocalPrivacy
from fedrun.privacy.none import NoPrivacy
from fedrun.privacy.secure_agg import SecureAggregation
from fedrun.sampling import ClientSampler
from fedrun.server_model import GlobalModel
from fedrun.strategies.client_models import ClientModels
from fedrun.strategies.fed_distill import FedDistill
from fedrun.strategies.fedadagrad import FedAdagrad
from fedrun.strategies.fedadam import FedAdam
from fedrun.strategies.fedavg import FedAvg
from fedrun.strategies.fedavgm import FedAvgM
from fedrun.strategies.feddf import FedDF
from fedrun.strategies.fedprox import FedProx, ProximalTerm
from fedrun.strategies.fedyogi import FedYogi
from fedrun.strategies.geometric_median import GeometricMedian
from fedrun.strategies.krum import Krum
from fedrun.strategies.median import Median
from fedrun.strategies.scaffold import ClientControls, ControlVariates, Scaffold
from fedrun.strategies.trimmed_mean import TrimmedMean


def strategies(fedavg: FedAvg, fedavgm: FedAvgM, fedadam: FedAdam, fedyogi: FedYogi, fedadagrad: FedAdagrad,
               fedprox: FedProx, krum: Krum, median: Median, trimmed_mean: TrimmedMean,
               geometric_median: GeometricMedian, feddf: FedDF, scaffold: Scaffold,
               fed_distill: FedDistill) -> Iterator[Strategy]:
    yield fedavg
    yield fedavgm
    yield fedadam
    yield fedyogi
    yield fedadagrad
    yield fedprox
    yield krum
    yield median
    yield trimmed_mean
    yield geometric_median
    yield feddf
    yield scaffold
    yield fed_distill


def local_rules(proximal: ProximalTerm, control_variates: ControlVariates) -> Iterator[LocalRule]:
    yield proximal
    yield control_variates


def mechanisms(none: NoPrivacy, local: LocalPrivacy, central: CentralPrivacy,
               secure: SecureAggregation) -> Iterator[Mechanism]:
    yield none
    yield local
    yield central
    yield secure


def client_hooks(no_attack: NoAttack, poisoning: ModelPoisoning, no_compression: NoCompression, top_k: TopK,
                 quantizer: StochasticQuantizer, scaffold_controls: ClientControls,
                 client_models: ClientModels) -> Iterator[ClientHook]:
    """Attacks, compressors, and the client-side state of SCAFFOLD and of logit exchange."""
    yield no_attack
    yield poisoning
    yield no_compression
    yield top_k
    yield quantizer
    yield scaffold_controls
    yield client_models


def compressors(no_compression: NoCompression, top_k: TopK, quantizer: StochasticQuantizer) -> Iterator[StatefulHook]:
    """Compression's state (error feedback) is checkpointed: fedrun.loop.checkpoint_state."""
    yield no_compression
    yield top_k
    yield quantizer


def samplers(sampler: ClientSampler) -> Iterator[Sampler]:
    yield sampler


def server_models(global_model: GlobalModel, client_models: ClientModels) -> Iterator[ServerModel]:
    yield global_model
    yield client_models


def backends(sequential: SequentialBackend, process: ProcessBackend, ray: RayBackend,
             vectorized: VectorizedBackend) -> Iterator[Backend]:
    yield sequential
    yield process
    yield ray
    yield vectorized
