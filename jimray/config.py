"""Configuration: one pydantic model per stage (``extra="forbid"``), composed into a :class:`JobConfig`.

A job is a YAML file; ``--set key.sub=value`` overrides any field; the resolved config is saved with
every run. :func:`load_job` turns every user mistake (missing file, bad YAML, unknown key, wrong type)
into a :class:`ConfigError` whose message names the file, the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jimray.errors import JimrayError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(JimrayError):
    """A user-facing configuration problem; the message says what is wrong and how to fix it."""


class DataConfig(_Strict):
    """Where the subtomograms come from and their geometry."""

    path: str | None = Field(
        None, description="STAR file, folder of Parquet shards, or folder of MRC files; None = embedded demo"
    )
    simulate_per_class: int = Field(50, ge=1, description="when path is None: simulated particles per structure")
    simulate_snr: float = Field(0.1, gt=0, description="when path is None: SNR of the simulated particles")
    simulate_seed: int = 0
    box_size: int = Field(32, ge=8, le=256, description="subtomogram edge in voxels")
    voxel_size_angstrom: float | None = Field(None, gt=0, description="override when files lack it")
    tilt_range_degrees: float = Field(60.0, gt=0, le=90, description="largest tilt; 60 = 30-degree wedge")
    normalize: bool = Field(True, description="zero mean, unit variance per subtomogram")


class ModelConfig(_Strict):
    """Jim-Net sizes (see :mod:`jimray.model.jimnet`)."""

    channels: list[int] = Field(
        default_factory=lambda: [8, 16, 32],
        min_length=1,
        description="feature channels per extractor level; levels are spectrally pooled from the box down to "
        "feature_size (e.g. 32 -> 16 -> 8)",
    )
    feature_size: int = Field(8, ge=2, le=16, description="edge of the feature grid the correlation layers see")
    stages: int = Field(2, ge=2, description="coarse-to-fine alignment stages (m >= 2)")
    local_radius: int = Field(2, ge=1, description="radius r of the local correlation layer")
    dilations: list[int] = Field(default_factory=lambda: [1, 2, 4], description="stacked dilated convolutions")
    regressor_channels: int = Field(32, ge=4, description="conv channels of each stage's regressor")
    feature_dim: int = Field(64, ge=4, description="per-stage feature size in F(s, t)")
    rotation_representation: Literal["6d", "quaternion"] = "6d"
    max_shift_fraction: float = Field(0.25, gt=0, le=0.5, description="translation bound, fraction of box")
    lowpass_cycles_per_voxel: float = Field(0.25, gt=0, le=0.5, description="t of the constrained CC loss")
    pose_decoder: Literal["procrustes", "regressor"] = Field(
        "procrustes",
        description="how each stage turns its correlation map into a pose: 'procrustes' = soft correspondences "
        "fitted in closed form, plus the regressor's small correction; 'regressor' = the paper's learned "
        "regressor alone (jimray.model.decoders)",
    )
    decoder_temperature: float = Field(10.0, gt=0, description="initial softmax temperature of the decoders")
    pooled_statistics: bool = Field(
        True,
        description="append the source's pooled feature statistics (mean and std of every extractor level) to "
        "F(s, t): a position-independent summary that helps the clustering branch",
    )


class GMMConfig(_Strict):
    """Gaussian mixture fitted each round on the embeddings."""

    n_components: int | None = Field(None, ge=1, description="K; None = choose among candidates (k_selection; "
                                     "BIC when consensus_dims is null)")
    k_selection: Literal["distinct", "heldout"] = Field(
        "distinct", description="how K is chosen when n_components is null: distinct = the largest K whose "
        "clusters' half-set averages their other halves tell apart (common frame only, jimray.cluster.distinct); "
        "heldout = held-out likelihood of the consensus (also the rule of frame.embedding: network)")
    candidates: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8, 10])
    covariance_type: Literal["full", "diag"] = "full"
    reg_covar: float = Field(1e-4, gt=0)
    n_init: int = Field(3, ge=1)
    max_iter: int = Field(200, ge=1)
    tol: float = Field(1e-4, gt=0)
    pca_dims: int | None = Field(16, ge=1, description="reduce embeddings to this many PCA dims; None = off")
    init_sample: int = Field(20000, ge=100, description="points gathered for k-means++ seeding; also the most "
                             "rows the consensus is fitted on (chosen by a hash of their ids; its rule labels all)")
    consensus_dims: list[int] | None = Field(
        default_factory=lambda: [4, 6, 8, 12, 16],
        description="PCA sizes of the consensus ensemble (one diagonal mixture per size and seed, combined by "
                    "k-means on their labels, jimray.cluster.consensus); null = one mixture at pca_dims")
    consensus_seeds: int = Field(2, ge=1, description="seeds per PCA size in the consensus ensemble")
    consensus_restarts: int = Field(4, ge=1, description="consensus clusterings per fit; the one whose mixture "
                                    "fits the whitened embedding best is kept (jimray.cluster.consensus)")
    selection_pca_dims: int | None = Field(16, ge=1, description="K selection scores held-out likelihood on the "
                                           "whitened PCA projection to this size (null: every dimension)")
    distinct_scoring: Literal["pose", "search"] = Field(
        "pose", description="how k_selection distinct scores the particles against the half-set averages: 'pose' "
        "from the pose each already has in the cluster's frame, refined locally (27 rotations within a third of "
        "frame.angular_step_degrees, Fourier-binned) and scored at full sampling with a shift search; 'search' with "
        "the frame's global rotation search (Fourier-binned). 'pose' got K right on 11 of 13 benchmark data sets, "
        "'search' on 6 of 11 (BENCHMARKS.md, issue 12)")
    distinct_lowpass_cycles_per_voxel: float | None = Field(
        None, gt=0.0, le=0.5, description="k_selection distinct scores up to this frequency (cycles/voxel); null = "
        "the frame's frame.lowpass_cycles_per_voxel (0.25). With distinct_scoring search, above 0.25 the search can "
        "no longer run Fourier-binned (several times slower)")
    seed: int = 0


class TrainConfig(_Strict):
    """Pair-matching rounds (Algorithm 1) and the optimiser."""

    rounds: int = Field(5, ge=1)
    epochs_per_round: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    gamma: list[float] = Field(default_factory=lambda: [1.0, 1.0], description="alignment weight per stage")
    lambda_reg: float = Field(0.0, ge=0, description="weight of the rigid-transform regulariser L_R")
    reservoir_per_cluster: int = Field(512, ge=1, description="target volumes kept per cluster by the sampler")
    init_from: str | None = Field(
        None, description="start from this pretrained model (`jimray pretrain`'s pretrained.pt); None = random"
    )
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32",
        description="numeric precision of each training step, rounds and `jimray pretrain` (jimray.precision): "
        "fp32 = torch's defaults, nothing changed; tf32 = on CUDA, matmuls and cuDNN convolutions as TensorFloat-32 "
        "(no effect on CPU); bf16 = forward and loss under torch.autocast bfloat16 on the device (CUDA or CPU), "
        "FFTs, resampling and pose fits kept in float32, float32 weights, no loss scaling needed",
    )
    seed: int = 0


class PretrainConfig(_Strict):
    """``jimray pretrain``: the alignment branch trained by the unsupervised alignment loss alone on simulated
    pairs of the embedded structures, with a curriculum of relative rotation angles (small first), before the
    rounds (``train.init_from``). Box, wedge and voxel size come from the ``data`` section."""

    structures: list[str] | None = Field(None, description="embedded structure names; None = all six")
    snr: float = Field(0.1, gt=0, description="SNR of the simulated pairs")
    curriculum: list[tuple[float, int]] = Field(
        default_factory=lambda: [(30.0, 1000), (60.0, 800)],
        min_length=1,
        description="stages [largest relative rotation angle in degrees, steps], small angles first; wider stages "
        "(90, 180) made the learned alignment worse in the learning check, multi-start anchors cover the rest",
    )
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    eval_pairs: int = Field(32, ge=1, description="held-out pairs per evaluation set")
    eval_every: int = Field(200, ge=1, description="steps between held-out evaluations")
    seed: int = 0

    @model_validator(mode="after")
    def _angles(self) -> PretrainConfig:
        for angle, steps in self.curriculum:
            if not 0 < angle <= 180 or steps < 1:
                raise ValueError(f"pretrain.curriculum stage [{angle}, {steps}]: the angle must lie in (0, 180] "
                                 "degrees and the steps be >= 1")
        return self


class FrameConfig(_Strict):
    """The embedding each round's mixture clusters (:mod:`jimray.cluster.frame`)."""

    embedding: Literal["frame", "network"] = Field(
        "frame", description="frame: aligned scores against mode-seeking references; network: Jim-Net F(x, x)"
    )
    n_references: int = Field(45, ge=2, description="references R of the common frame")
    members_per_reference: int = Field(15, ge=1, description="particles averaged into each reference per round")
    angular_step_degrees: float = Field(30.0, gt=0, le=90, description="rotation grid of the alignment")
    lowpass_cycles_per_voxel: float = Field(0.25, gt=0, le=0.5, description="highest frequency scored")
    max_shift_voxels: float = Field(4.0, ge=0, description="largest shift searched")
    mask_radius_fraction: float = Field(0.33, gt=0, le=0.5, description="reference mask radius, fraction of box")

    def options(self, seed: int):
        from jimray.cluster.frame import FrameOptions

        return FrameOptions(self.n_references, self.members_per_reference, self.angular_step_degrees,
                            self.lowpass_cycles_per_voxel, self.max_shift_voxels, self.mask_radius_fraction,
                            seed=seed)


class ScalingConfig(_Strict):
    """How many Ray Train workers and what each needs."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional CPUs leave room for Ray Data reads")
    gpus_per_worker: float = Field(1.0, ge=0)
    max_failures: int = Field(2, ge=0, description="worker failures tolerated; resumes from last round")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes (Ray Train's ScalingConfig.placement_strategy): PACK "
        "fills a node first (least traffic), SPREAD puts each on its own node where it can (more memory bandwidth "
        "and disks per worker, gradients cross the network). With SPREAD every node must keep a whole CPU free "
        "for Ray Data's read tasks: on 2 nodes x 1 CPU with 0.5-CPU workers the first read waited forever")


class OutputConfig(_Strict):
    dir: str = Field("runs/quickstart", description="run directory (config, metrics, checkpoints)")


class SimulateTomogramsConfig(_Strict):
    """Pipeline smoke variant: simulated tomograms of embedded structures instead of real ones (with the truth)."""

    count: int = Field(1, ge=1, description="number of simulated tomograms")
    shape: list[int] = Field(default_factory=lambda: [64, 160, 160], min_length=3, max_length=3,
                             description="tomogram size z, y, x (voxels); each at least data.box_size")
    particles_per_tomogram: int = Field(24, ge=1)
    snr: float = Field(0.1, gt=0, description="var(signal in a particle box) / var(noise); .inf = no noise")
    seed: int = Field(0, description="tomogram i uses seed + i")
    structures: list[str] | None = Field(None, description="embedded structure names; None = all six")
    min_distance_voxels: float | None = Field(None, gt=0, description="between particle centres; None = box")


class PickStageConfig(_Strict):
    """``jimray pick`` settings (difference of Gaussians, :mod:`jimray.pick.dog`)."""

    particle_diameter_angstrom: float = Field(200.0, gt=0)
    threshold: float = Field(3.0, description="peak threshold in noise-std units of the DoG map")
    edge_margin_voxels: float = Field(0.0, ge=0, description="ignore peaks this close to a face")
    min_distance_voxels: float | None = Field(None, gt=0, description="between picks; None = particle radius")
    invert: bool = Field(False, description="particles are dark (raw cryo-ET contrast)")


class ExtractStageConfig(_Strict):
    """``jimray extract`` settings; box and tilt range default to (and must agree with) the data section."""

    box: int | None = Field(None, ge=4, description="box edge in voxels; None = data.box_size")
    tilt_range_degrees: float | None = Field(None, gt=0, le=90, description="None = data.tilt_range_degrees")
    rows_per_shard: int = Field(256, ge=1)


class PredictStageConfig(_Strict):
    """``jimray predict`` settings."""

    actors: int = Field(2, ge=1, description="model actors (one GPU each when there are GPUs)")
    batch_size: int = Field(16, ge=1)
    iterations: int = Field(2, ge=0, description="template align-and-average iterations")


class AverageStageConfig(_Strict):
    """``jimray average`` settings (gold-standard half maps, FSC, report.html)."""

    iterations: int = Field(3, ge=0, description="template refinement iterations per half")
    angular_step_degrees: float = Field(30.0, gt=0)
    refine: bool = Field(True, description="refine the predicted poses; False = average under them as they are")


class PipelineConfig(_Strict):
    """``jimray run``: tomograms -> pick -> extract -> train -> predict -> average (:mod:`jimray.pipeline`).
    Give either ``tomograms`` (MRC paths or globs) or ``simulate_tomograms``."""

    simulate_tomograms: SimulateTomogramsConfig | None = None
    tomograms: list[str] = Field(default_factory=list, description="MRC paths or globs (relative: to the cwd)")
    subtomograms: bool = Field(
        False, description="start from the data section's subtomograms instead of tomograms (data.path; null = "
        "simulate the embedded structures): stages simulate -> train -> predict -> average -> report")
    pick: PickStageConfig = Field(default_factory=PickStageConfig)
    extract: ExtractStageConfig = Field(default_factory=ExtractStageConfig)
    predict: PredictStageConfig = Field(default_factory=PredictStageConfig)
    average: AverageStageConfig = Field(default_factory=AverageStageConfig)

    @model_validator(mode="after")
    def _one_source(self) -> PipelineConfig:
        if (self.simulate_tomograms is not None) + bool(self.tomograms) + self.subtomograms != 1:
            raise ValueError("give either pipeline.tomograms (MRC paths or globs) or pipeline.simulate_tomograms, "
                             "or pipeline.subtomograms: true (start from the data section), not two and not none")
        return self


class JobConfig(_Strict):
    """A whole training job, as written in ``jobs/*.yaml``."""

    name: str = "job"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    gmm: GMMConfig = Field(default_factory=GMMConfig)
    frame: FrameConfig = Field(default_factory=FrameConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    pipeline: PipelineConfig | None = Field(None, description="stages of `jimray run`; None = training only")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="`jimray pretrain` settings")

    @model_validator(mode="after")
    def _pipeline_geometry(self) -> JobConfig:
        extract = self.pipeline.extract if self.pipeline is not None else None
        if extract is not None and extract.box not in (None, self.data.box_size):
            raise ValueError(f"pipeline.extract.box is {extract.box} but data.box_size is {self.data.box_size}: "
                             "the model trains on data.box_size boxes; make them equal or drop pipeline.extract.box")
        if extract is not None and extract.tilt_range_degrees not in (None, self.data.tilt_range_degrees):
            raise ValueError(f"pipeline.extract.tilt_range_degrees is {extract.tilt_range_degrees} but "
                             f"data.tilt_range_degrees is {self.data.tilt_range_degrees}; make them equal or drop it")
        return self

    @model_validator(mode="after")
    def _gamma_per_stage(self) -> JobConfig:
        if len(self.train.gamma) != self.model.stages:
            raise ValueError(
                f"train.gamma has {len(self.train.gamma)} weights but model.stages is {self.model.stages}: "
                "give one alignment weight per stage"
            )
        return self


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.rounds=3), got '{item}'")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_validation(error: ValidationError, source: str) -> str:
    lines = [f"{source}: the job configuration is not valid:"]
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{where}': check its spelling against `jimray config-schema`")
        else:
            lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)


BASE_KEY = "base"


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section (nested mappings merged, other values replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_job_file(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A job YAML as a dict; a top-level ``base: other.yaml`` (relative to this file) is read first and this
    file's sections are merged over it, so a job can reuse another's settings and change a few."""
    if not p.is_file():
        raise ConfigError(f"job file '{p}' does not exist: pass a YAML file such as jobs/quickstart.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc}); fix the syntax at the line shown") from None
    if raw is None:  # an empty file (or only comments) would silently run the whole default job
        raise ConfigError(f"{p}: the job file is empty; write the sections you need (see jobs/quickstart.yaml and "
                          "`jimray config-schema`)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a job file must be a mapping of sections (data, model, ...)")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{p}: '{BASE_KEY}' must be the path of another job file, e.g. base: quickstart.yaml")
    base_path = (p.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{p}: '{BASE_KEY}: {base}' makes a loop of job files; remove one of the base keys")
    if not base_path.is_file():
        raise ConfigError(f"{p}: {BASE_KEY} '{base}' does not exist (relative paths are taken from {p.parent})")
    return _merge(_read_job_file(base_path, (*seen, p.resolve())), raw)


def load_job(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML (or defaults when ``path`` is None; ``base:`` merges another job file under it, see
    :func:`_read_job_file`), apply ``--set`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = _read_job_file(Path(path))
    apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
