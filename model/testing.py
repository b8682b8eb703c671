"""Small, deterministic stand-ins for tests and demos: a tiny config, tokenizer and random weights.

Nothing here downloads anything. The corpus is embedded and procedurally
extended with a seeded generator, the tokenizer is trained on it in well under
a second, and random parameters are drawn with NumPy from the shapes in
``griffin_batch.model.checkpoint.param_shapes``, so the same call gives the same bytes on any
machine.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from griffin_batch.model import checkpoint
from griffin_batch.model.config import GriffinConfig, griffin_pattern
from griffin_batch.model.tokenizer import END_OF_TURN, START_OF_TURN

_PARAGRAPHS = """\
The lighthouse keeper climbed the narrow stairs every evening at dusk. He carried a lamp, a
notebook and a thermos of tea, and he wrote down the weather, the ships that passed and the
birds that rested on the railing.

In the morning the harbour was quiet. Fishermen mended their nets, children ran along the
pier, and the baker opened the shutters of a small café that smelled of bread and coffee.

Mathematics is the art of giving the same name to different things. A function maps every
input to exactly one output; a sequence is a function whose inputs are the natural numbers.
For example, 1, 2, 4, 8, 16 and 32 are the first powers of two, and 3.14159 approximates pi.

def greet(name):
    \"\"\"Returns a greeting for name.\"\"\"
    if not name:
        raise ValueError("name must not be empty")
    return f"Hello, {name}!"

Naïve readers of a résumé sometimes confuse the façade with the building. Über-efficient
schedules, crème brûlée, the jalapeño harvest and a piñata: words borrowed into English keep
their accents.

Q: What is the capital of France?
A: The capital of France is Paris.

Q: How many legs does a spider have?
A: A spider has eight legs.
"""

_SUBJECTS = (
    "the old sailor",
    "a curious student",
    "the committee",
    "my neighbour",
    "the small robot",
    "a tired engineer",
    "the river",
    "our teacher",
    "the garden",
    "a quiet village",
    "the orchestra",
    "every programmer",
    "the museum guide",
    "a young painter",
    "the weather",
)
_VERBS = (
    "watched",
    "explained",
    "carried",
    "remembered",
    "built",
    "described",
    "found",
    "opened",
    "measured",
    "followed",
    "painted",
    "repaired",
    "answered",
    "collected",
    "translated",
)
_OBJECTS = (
    "the long report",
    "a wooden boat",
    "the distant mountains",
    "three green apples",
    "the broken clock",
    "an unusual question",
    "the evening news",
    "a map of the city",
    "the recipe for soup",
    "several letters",
    "the morning train",
    "a bright yellow kite",
    "the history of science",
    "a simple algorithm",
    "the winter festival",
)
_TAILS = (
    "before the sun went down",
    "with great care",
    "in the afternoon",
    "without saying a word",
    "after a long discussion",
    "during the storm",
    "for the second time",
    "near the station",
    "because nobody else could",
    "while the kettle boiled",
    "on a Tuesday in March",
    "at exactly seven o'clock",
    "in less than an hour",
    "despite the noise",
    "once again",
)

# Common English words, for sentences with a wider vocabulary than the templates above.
_WORD_TEXT = """
about above across action activity actually add address admit adult affect after again against
age agency agent agree ahead air allow almost alone along already also although always among
amount analysis animal another answer anyone anything appear apply approach area argue arm
around arrive article artist assume attack attention audience author authority available avoid
away baby back bad bag ball bank bar base beat beautiful because become bed before begin
behavior behind believe benefit best better between beyond big bill billion bit black blood
blue board body book born both box boy break bring brother budget build building business
buy call camera campaign cancer candidate capital car card care career carry case catch cause
cell center central century certain chair challenge chance change character charge check child
choice choose church citizen city civil claim class clear close coach cold collection college
color come commercial common community company compare computer concern condition conference
consider consumer contain continue control cost could country couple course court cover create
crime cultural culture cup current customer cut dark data daughter dead deal death debate decade
decide decision deep defense degree describe design despite detail determine develop difference
different difficult dinner direction director discover discuss disease doctor dog door down draw
dream drive drop drug during early east easy economic economy edge education effect effort eight
either election else employee energy enjoy enough enter entire environment especially establish
even evening event ever every evidence exactly example executive exist expect experience expert
explain eye face fact factor fail fall family far fast father fear federal feel field fight
figure fill film final finally financial find fine finger finish fire firm first fish five floor
fly focus food foot force foreign forget form former forward four free friend front full fund
future game garden gas general generation girl give glass goal good government great green ground
group grow growth guess gun guy hair half hand hang happen happy hard head health hear heart heat
heavy help here herself high himself history hold home hope hospital hot hotel hour house however
huge human hundred husband idea identify image imagine impact important improve include including
increase indeed indicate individual industry information inside instead institution interest
interesting international interview investment involve issue item itself job join just keep key
kid kill kind kitchen know knowledge land language large last late later laugh law lawyer lay
lead leader learn least leave left leg legal less letter level life light like likely line list
listen little live local long look lose loss lot love low machine magazine main maintain major
majority make manage management manager many market marriage material matter maybe mean measure
media medical meet meeting member memory mention message method middle might military million
mind minute miss mission model modern moment money month more morning most mother mouth move
movement movie much music must myself name nation national natural nature near nearly necessary
need network never news newspaper next nice night none nor north note nothing notice number occur
offer office officer official often oil old once only onto open operation opportunity option order
organization other others outside over own owner page pain painting paper parent part participant
particular particularly partner party pass past patient pattern pay peace people perform
performance perhaps period person personal phone physical pick picture piece place plan plant play
player point police policy political politics poor popular population position positive possible
power practice prepare present president pressure pretty prevent price private probably problem
process produce product production professional professor program project property protect prove
provide public pull purpose push quality question quickly quite race radio raise range rate
rather reach read ready real reality realize really reason receive recent recently recognize
record red reduce reflect region relate relationship religious remain remember remove report
represent require research resource respond response responsibility rest result return reveal
rich right rise risk road rock role room rule run safe same save scene school science scientist
score sea season seat second section security seek seem sell send senior sense series serious
serve service set seven several shake share shoot short shot should shoulder show side sign
significant similar simple simply since sing single sister sit site situation six size skill skin
small smile social society soldier some somebody someone something sometimes son song soon sort
sound source south southern space speak special specific speech spend sport spring staff stage
stand standard star start state statement station stay step still stock stop store story strategy
street strong structure student study stuff style subject success successful such suddenly suffer
suggest summer support sure surface system table take talk task tax teach teacher team technology
television tell ten tend term test thank theory thing think third those though thought thousand
threat three through throughout throw thus time today together tonight total tough toward town
trade traditional training travel treat treatment tree trial trip trouble true truth try turn
type under understand unit until upon usually value various very victim view violence visit voice
vote wait walk wall want war watch water weapon wear week weight well west western whatever
wheel whether which while white whole whom whose wide wife will win wind window wish within
without woman wonder word work worker world worry would write writer wrong yard yeah year yes yet
young yourself
"""


def corpus(num_sentences: int = 3000, seed: int = 0) -> str:
    """English text for training tiny tokenizers: fixed paragraphs plus seeded sentences.

    Includes accents, digits, code, whitespace runs and newlines so that a tiny
    vocabulary still has pieces for them.
    """
    rng = random.Random(seed)
    lines = [_PARAGRAPHS]
    for _ in range(num_sentences):
        s = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_TAILS)}"
        )
        s = s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))
        if rng.random() < 0.1:
            s = f"{rng.randint(0, 2024)} {s}"
        if rng.random() < 0.05:
            s = "    " + s
        lines.append(s)
        if rng.random() < 0.5:
            words = rng.sample(_WORD_TEXT.split(), rng.randint(4, 12))
            lines.append(" ".join(words).capitalize() + rng.choice((".", ",", ";", ":")))
    return "\n".join(lines) + "\n"


def train_tiny_tokenizer(
    path: str | None = None,
    *,
    vocab_size: int = 512,
    add_dummy_prefix: bool = False,
    text: str | None = None,
    **trainer_options: Any,
) -> bytes:
    """Trains a Gemma-like SentencePiece model and returns (and optionally writes) its bytes.

    Like Gemma's tokenizer: pad=0, eos=1, bos=2, unk=3, user-defined
    ``<start_of_turn>``/``<end_of_turn>``, byte fallback, identity
    normalization, whitespace kept as is, digits split.

    Args:
      path: Where to write the ``.model`` file (local path); None writes nothing.
      vocab_size: Number of pieces; must exceed 256 bytes + specials + characters.
      add_dummy_prefix: Prefix text with "▁" when encoding (and drop it when
        decoding), as classic SentencePiece models do; Gemma does not.
      text: Training text; defaults to ``corpus()``.
      **trainer_options: Overrides of the SentencePieceTrainer options above.

    Returns:
      The serialized model.
    """
    import sentencepiece as spm

    text = corpus() if text is None else text
    out = io.BytesIO()
    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=[START_OF_TURN, END_OF_TURN, "\n"],
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    options.update(trainer_options)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=out, **options
    )
    proto = out.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(proto)
    return proto


def tiny_config(**overrides: Any) -> GriffinConfig:
    """A Griffin config small enough to compile and run in a second on CPU."""
    fields: dict[str, Any] = dict(
        vocab_size=256,
        width=64,
        mlp_expanded_width=96,
        num_heads=4,
        lru_width=64,
        block_types=griffin_pattern(3),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=16,
        logits_soft_cap=30.0,
    )
    fields.update(overrides)
    return GriffinConfig(**fields)


def random_params(
    config: GriffinConfig,
    *,
    seed: int = 0,
    dtype: Any = np.float32,
    noise: float = 0.02,
) -> dict[str, Any]:
    """Random parameters in the reference tree with reference-like scales, as NumPy arrays.

    Matrices are LeCun-normal; the RG-LRU ``a_param`` gives decay rates in
    [0.9, 0.999] as the reference initializer does; biases and norm scales get
    ``noise``-sized values instead of the reference's zeros so every leaf
    matters numerically. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)

    def leaf(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name == "a_param":
            # softplus(a_param) = -log(a) with a ~ U[0.9, 0.999], as the reference samples it.
            a = rng.uniform(0.9, 0.999, size=shape)
            x = np.log(np.expm1(-np.log(a)))
        elif name in ("scale", "b", "bias"):
            x = noise * rng.standard_normal(shape)
        elif name == "input_embedding":
            x = rng.standard_normal(shape) / math.sqrt(shape[1])
        elif name == "w" and len(shape) == 2:  # conv_1d [temporal_width, e]
            x = rng.standard_normal(shape) / math.sqrt(shape[0])
        else:  # kernel [in, out], ffw_up w [2, d, m], gate w [n, i, j]: fan-in is axis -2
            x = rng.standard_normal(shape) / math.sqrt(shape[-2])
        return x.astype(dtype)

    def build(tree: dict[str, Any]) -> dict[str, Any]:
        return {k: build(v) if isinstance(v, dict) else leaf(k, v) for k, v in tree.items()}

    return build(checkpoint.param_shapes(config))


def noisy_params(config: GriffinConfig, *, seed: int = 0, noise: float = 0.3) -> dict[str, Any]:
    """``random_params`` with ``noise``-sized Gaussian noise on every leaf, as NumPy arrays.

    For tests that compare tokens: with no leaf near its initial value, greedy
    decoding does not collapse into one-token loops, and a wrong weight cannot
    hide behind a zero. NumPy throughout, so it costs milliseconds, where
    ``griffin.init_params`` traces the whole model.
    """
    return perturb(random_params(config, seed=seed), seed=seed + 1, noise=noise)


def perturb(params: Any, *, seed: int = 0, noise: float = 0.02) -> Any:
    """Adds ``noise``-sized Gaussian noise to every leaf (e.g. to the reference's zero biases)."""
    rng = np.random.default_rng(seed)

    def add(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: add(tree[k]) for k in sorted(tree)}
        x = np.asarray(tree)
        return (x + noise * rng.standard_normal(x.shape)).astype(x.dtype)

    return add(params)


def iter_leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested dict, paths joined with "/"."""
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, dict):
            yield from iter_leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def reference_config(config: GriffinConfig, **overrides: Any):
    """The same config as DeepMind's reference ``recurrentgemma.GriffinConfig`` (test-only dep)."""
    from recurrentgemma import jax as rg

    if config.conv1d_width != 4:
        raise ValueError("the reference model has a fixed conv1d_width of 4")
    fields: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        width=config.width,
        mlp_expanded_width=config.mlp_expanded_width,
        num_heads=config.num_heads,
        block_types=tuple(rg.TemporalBlockType[b.upper()] for b in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window_size,
        logits_soft_cap=config.logits_soft_cap,
        lru_width=config.lru_width,
        scan_type=rg.ScanType.LINEAR_NATIVE,
    )
    fields.update(overrides)
    return rg.GriffinConfig(**fields)
