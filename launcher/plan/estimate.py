"""What a run needs per device, how fast it goes and what it sends, per ZeRO stage.

Sources of every figure (the report names them too):
- parameters: `model.shapes.param_counts`, counted on the model built on the meta device;
- model states (weights, gradients, optimizer, ZeRO buffers), per device, Psi parameters over
  N data-parallel ranks, p bytes per parameter (2 in bf16/fp16, 4 in fp32), in the terms of
  DeepSpeed's own estimators (`deepspeed.runtime.zero.stage_1_and_2.
  estimate_zero2_model_states_mem_needs`, `...stage3.estimate_zero3_model_states_mem_needs`:
  16-bit weights 2, gradients 2 + 4 (16-bit and fp32), fp32 master 4, Adam moments 8, the
  last three partitioned from ZeRO-2 on, everything from ZeRO-3 on) generalised to p:

      stage 0   p Psi + p Psi + (m + 8) Psi               m = 4 (fp32 master) when p = 2
      stage 1   p Psi + (p Psi + 4 Psi / N) + (4 + 8) Psi / N
      stage 2   p Psi + (p + 4) Psi / N + (4 + 8) Psi / N
      stage 3   p Psi / N + (p + 4) Psi / N + (4 + 8) Psi / N, + 2 p x the largest module
                gathered at a time (DeepSpeed's `4 * largest_layer_params` at p = 2)

  These are what is live at the optimizer step. The peak adds the larger of (a) the
  backward's activations, the gradient buckets of `reduce_bucket_size` elements (two with
  overlap_comm) that DeepSpeed allocates with contiguous_gradients, and ZeRO-3's gathered
  parameters, and (b) the optimizer step's temporaries (`Assumptions.optimizer_workspace`).
  DeepSpeed keeps an fp32 master copy from
  ZeRO-1 on even for fp32 weights (a clone of the partition), so fp32 pays for it too. The
  estimators' own totals are reported beside ours (16-bit runs; ZeRO-3's counts 2 bytes of
  gradients less than ours). ZeRO 0 and 1 have no DeepSpeed estimator;
- activations: `model.shapes.activation_bytes`;
- FLOPs per sample: `model.rtd_flops_per_sample`, the formula the trainer's MFU uses;
- communication, per rank and step, ring collectives over N ranks (Rajbhandari et al., "ZeRO",
  2020, section 7): ZeRO-0 all-reduces the gradients once per step (2 (N-1)/N Psi p);
  ZeRO-1 reduce-scatters them once and all-gathers the updated weights; ZeRO-2 reduce-scatters
  at every micro batch (DeepSpeed reduces each micro batch's gradients into the partition)
  and all-gathers the weights once; ZeRO-3 all-gathers the weights in forward and in backward
  and reduce-scatters the gradients, at every micro batch. Across nodes the collectives are
  taken as hierarchical (NCCL's rings/trees: reduce inside the node over NVLink, then rings
  over the nodes), so a node sends the same bytes as one rank of an N = nodes ring; the
  bandwidth that hides them is those bytes over the step's compute time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.config import DebertaV3Config
from model.flops import rtd_flops_per_sample
from model.shapes import ActivationBytes, ParamCounts, activation_bytes, param_counts

GIB = 2**30
STAGES = (0, 1, 2, 3)
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float  # per device, GiB
    node_bandwidth_gbps: float = 0.0  # inter-node, Gbit/s per node; 0: unknown (not used)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    preset: str
    seq_len: int = 512
    global_batch: int = 8192
    steps: int = 500_000
    vocab_size: int = 0  # 0: the preset's (released) vocabulary
    sharing: str = "gdes"
    mask_prob: float = 0.15
    dropout: float = 0.1
    precision: str = "bf16"
    attention: str = "eager"
    gradient_checkpointing: bool = False

    def model_config(self) -> DebertaV3Config:
        overrides = {"gradient_checkpointing": self.gradient_checkpointing}
        if self.vocab_size:
            overrides["vocab_size"] = self.vocab_size
        return DebertaV3Config.from_preset(self.preset, **overrides)


@dataclass(frozen=True)
class Assumptions:
    mfu: float  # model FLOP utilisation of the step (model/flops.py FLOPs / peak)
    mfu_source: str
    peak_tflops: float  # per device
    zero3_step_ratio: float  # ZeRO-3 step time / ZeRO-2 step time
    zero3_source: str
    safety_margin: float = 0.10  # fraction of device memory left free
    runtime_gb: float = 2.0  # CUDA context, NCCL and allocator reserve per device
    adam_state_bytes: int = 8  # exp_avg + exp_avg_sq, fp32
    master_bytes: int = 4  # the fp32 copy of the weights the optimizer updates
    # fp32 temporaries the size of the optimizer's partition during its step: 0 for
    # DeepSpeed's FusedAdam (the CUDA default), 1 for torch's foreach AdamW (CUDA tensors),
    # 2 for torch's single-tensor AdamW (CPU tensors: sqrt(v) and its quotient)
    optimizer_workspace: int = 0


@dataclass(frozen=True)
class EngineKnobs:
    """The ZeRO settings of the ds_configs that change memory (DeepSpeed's defaults)."""

    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    offload_optimizer: bool = False

    @classmethod
    def from_ds_config(cls, ds: dict) -> EngineKnobs:
        z = ds.get("zero_optimization", {})
        offload = z.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        return cls(
            reduce_bucket_size=int(z.get("reduce_bucket_size", cls.reduce_bucket_size)),
            overlap_comm=bool(z.get("overlap_comm", z.get("stage") == 3)),
            contiguous_gradients=bool(z.get("contiguous_gradients", True)),
            offload_optimizer=offload,
        )


@dataclass(frozen=True)
class StateMemory:
    """Model states per device, bytes, at the optimizer step (when all of them are live)."""

    weights: float
    gradients: float
    optimizer: float  # fp32 master + Adam moments (on the CPU with offload: 0 here)
    buffers: float  # gradient buckets, live during backward (freed by the step)
    gathered: float  # ZeRO-3: parameters gathered for the running module (not at the step)
    cpu_per_node: float  # offload: what the node's CPU memory holds
    deepspeed_gpu: float | None  # DeepSpeed's estimator, per device (None: no estimator)
    deepspeed_source: str

    workspace: float  # the optimizer step's temporaries (Assumptions.optimizer_workspace)

    @property
    def total(self) -> float:
        """What is live at the optimizer step (what `ModelStateProbe` measures)."""
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class Communication:
    """Bytes each rank sends per optimizer step, by collective."""

    all_reduce: float
    reduce_scatter: float
    all_gather: float

    @property
    def total(self) -> float:
        return self.all_reduce + self.reduce_scatter + self.all_gather


@dataclass(frozen=True)
class StagePlan:
    stage: int
    offload: bool
    states: StateMemory
    activation: ActivationBytes  # of one micro batch at `micro_batch`
    micro_batch: int  # the largest that fits and divides the global batch; 0: none fits
    grad_accum: int
    peak: float  # bytes per device at `micro_batch` (at 1 when nothing fits)
    budget: float  # device memory minus the safety margin
    step_s: float
    comm: Communication
    inter_node: float  # bytes each node sends to the others per step (hierarchical rings)
    bandwidth_needed: float  # bytes/s per node that hide `inter_node` behind the compute

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0

    @property
    def name(self) -> str:
        return f"ZeRO-{self.stage}" + ("+offload" if self.offload else "")


@dataclass(frozen=True)
class Plan:
    workload: Workload
    cluster: Cluster
    assumptions: Assumptions
    params: ParamCounts
    flops_per_token: float
    stages: list[StagePlan]

    @property
    def recommended(self) -> StagePlan | None:
        """The fastest stage that fits; then the largest micro batch; then the lowest stage."""
        fitting = [s for s in self.stages if s.fits]
        return min(
            fitting, key=lambda s: (round(s.step_s, 6), -s.micro_batch, s.stage), default=None
        )


def state_memory(
    stage: int, params: ParamCounts, cluster: Cluster, p: int, knobs: EngineKnobs, a: Assumptions
) -> StateMemory:
    """Model states per device (module docstring); DeepSpeed's estimate beside them."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi, n, opt = params.total, cluster.world, a.master_bytes + a.adam_state_bytes
    buckets = knobs.reduce_bucket_size * p * (2 if knobs.overlap_comm else 1)
    buckets = buckets if knobs.contiguous_gradients and stage >= 1 else 0
    weights, gathered = p * psi, 0.0
    if stage == 0:
        grads = p * psi
        optim = (a.adam_state_bytes + (a.master_bytes if p < 4 else 0)) * psi
    elif stage == 1:
        grads, optim = p * psi + 4 * psi / n, opt * psi / n
    else:
        grads, optim = (p + 4) * psi / n, opt * psi / n
    if stage == 3:
        weights, gathered = p * psi / n, 2 * p * params.largest_module
    # ZeRO-0 steps each parameter by itself, ZeRO >= 1 a flat partition per parameter group
    each = params.largest_module if stage == 0 else psi / n
    workspace = a.optimizer_workspace * 4 * each
    cpu = 0.0
    if knobs.offload_optimizer:  # gradient partitions and optimizer states on the CPU
        cpu = (grads + optim + workspace) * cluster.gpus_per_node
        grads, optim, workspace = 0.0, 0.0, 0.0
    where = {"num_gpus_per_node": cluster.gpus_per_node, "num_nodes": cluster.nodes}
    ds_gpu, source = None, "none (DeepSpeed has estimators for ZeRO-2 and ZeRO-3 only)"
    if stage == 2 and p == 2:
        _, ds_gpu = estimate_zero2_model_states_mem_needs(
            psi, **where, cpu_offload=knobs.offload_optimizer
        )
        source = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
    elif stage == 3 and p == 2:
        _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            psi,
            params.largest_module,
            **where,
            cpu_offload=knobs.offload_optimizer,
            cpu_offload_params=False,
        )
        source = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
    elif stage >= 2:
        source = "none for fp32 (DeepSpeed's estimators assume 16-bit weights)"
    return StateMemory(weights, grads, optim, buckets, gathered, cpu, ds_gpu, source, workspace)


def communication(stage: int, psi: int, world: int, p: int, accum: int) -> Communication:
    """Bytes per rank per step of the ring collectives (module docstring)."""
    ring = (world - 1) / world
    if stage == 0:
        return Communication(2 * ring * psi * p, 0.0, 0.0)
    if stage == 1:
        return Communication(0.0, ring * psi * p, ring * psi * p)
    if stage == 2:
        return Communication(0.0, ring * psi * p * accum, ring * psi * p)
    return Communication(0.0, ring * psi * p * accum, 2 * ring * psi * p * accum)


def largest_micro_batch(peak, budget: float, global_batch: int, world: int) -> int:
    """The largest micro batch b with peak(b) <= budget that divides the global batch over
    the ranks; 0 when not even 1 fits."""
    per_rank, best = global_batch // world, 0
    for b in range(1, per_rank + 1):
        if per_rank % b:
            continue
        if peak(b) > budget:
            break
        best = b
    return best


def plan_stage(
    stage: int,
    w: Workload,
    c: Cluster,
    a: Assumptions,
    knobs: EngineKnobs,
    params: ParamCounts,
    flops_per_sample: float,
) -> StagePlan:
    """Memory, micro batch, time and communication of one ZeRO stage."""
    p = PRECISIONS[w.precision]
    cfg = w.model_config()
    states = state_memory(stage, params, c, p, knobs, a)

    def act(b: int) -> ActivationBytes:
        return activation_bytes(
            cfg,
            b,
            w.seq_len,
            act_bytes=p,
            attention=w.attention,
            dropout=w.dropout,
            mask_prob=w.mask_prob,
        )

    def peak(b: int) -> float:
        backward = act(b).total + states.buffers + states.gathered
        return states.total + max(backward, states.workspace) + a.runtime_gb * GIB

    budget = c.gpu_memory_gb * GIB * (1 - a.safety_margin)
    micro = largest_micro_batch(peak, budget, w.global_batch, c.world)
    shown = max(micro, 1)
    accum = w.global_batch // (c.world * shown)
    compute = w.global_batch * flops_per_sample / (c.world * a.peak_tflops * 1e12 * a.mfu)
    step = compute * (a.zero3_step_ratio if stage == 3 else 1.0)
    comm = communication(stage, params.total, c.world, p, accum)
    # the ranks of a node reduce among themselves (NVLink) and each node takes part in rings
    # over the nodes: the same collectives with N = nodes, on the full payload
    shrink = ((c.nodes - 1) / c.nodes) / ((c.world - 1) / c.world) if c.world > 1 else 0.0
    inter_node = comm.total * shrink
    if c.node_bandwidth_gbps > 0:  # a known network: the step cannot beat its comm time
        step = max(step, inter_node / (c.node_bandwidth_gbps * 1e9 / 8))
    return StagePlan(
        stage=stage,
        offload=knobs.offload_optimizer,
        states=states,
        activation=act(shown),
        micro_batch=micro,
        grad_accum=accum,
        peak=peak(shown),
        budget=budget,
        step_s=step,
        comm=comm,
        inter_node=inter_node,
        bandwidth_needed=inter_node / compute,
    )


def plan(
    w: Workload,
    c: Cluster,
    a: Assumptions,
    knobs: dict[int, EngineKnobs],
    stages: tuple[int, ...] = STAGES,
) -> Plan:
    """Plan every stage in `stages` with its engine settings `knobs[stage]`."""
    if w.precision not in PRECISIONS:
        raise ValueError(f"precision={w.precision!r}; choices: {', '.join(PRECISIONS)}")
    if w.global_batch % c.world:
        raise ValueError(f"global batch {w.global_batch} is not divisible by {c.world} ranks")
    cfg = w.model_config()
    params = param_counts(cfg, w.sharing)
    flops = rtd_flops_per_sample(cfg, cfg.generator_config(), w.seq_len, w.mask_prob)
    plans = [plan_stage(s, w, c, a, knobs[s], params, flops) for s in stages]
    return Plan(w, c, a, params, flops / w.seq_len, plans)


def with_changes(a: Assumptions, **changes) -> Assumptions:
    """A copy of the assumptions with some fields changed (negative controls, what-ifs)."""
    return dataclasses.replace(a, **changes)
