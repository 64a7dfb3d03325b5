"""The zoo: transformers architectures built from tiny configs (no downloads), and the inputs each one takes.

One entry per architecture: a model factory (a small config, seeded weights, eval mode for parity: dropout off) and
an inputs builder `(batch, length, seed) -> {name: tensor}`. `length` is the sequence length of text, or the number
of audio samples; images keep the size the config fixes (position embeddings are sized for it), so for vision
models only the batch changes between the example and the other input.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers as tf
from torch import nn

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXPERTS = "batched_mm"       # a traceable experts implementation (the eager per-expert loop is data-dependent)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(batch: int, length: int, seed: int) -> dict:
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=_generator(seed))}


def seq2seq(batch: int, length: int, seed: int) -> dict:
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=_generator(seed)),
            "decoder_input_ids": torch.randint(3, VOCAB, (batch, length - 2), generator=_generator(seed + 1))}


def images(size: int, channels: int = 3) -> Callable:
    def build(batch: int, length: int, seed: int) -> dict:
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=_generator(seed))}
    return build


def text_and_images(size: int) -> Callable:
    def build(batch: int, length: int, seed: int) -> dict:
        return {**tokens(batch, length, seed), **images(size)(batch, length, seed)}
    return build


def audio(batch: int, length: int, seed: int) -> dict:
    return {"input_values": torch.randn(batch, length * 40, generator=_generator(seed))}


def logits(output) -> torch.Tensor:
    return output.logits


def last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state


def logits_per_image(output) -> torch.Tensor:
    return output.logits_per_image


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], dict] = tokens
    output: Callable = logits
    length: int = 8                       # the example's length; the other input has batch 3 and length + 3
    ci: bool = False                      # in the default test run (a representative subset)
    peft_mamba_out_proj: bool = False     # PEFT refuses out_proj on Mamba types: lift that for the oracle
    known: dict = field(default_factory=dict)   # check -> why it fails (a lora_fx limitation left open)
    exclude: tuple = ()                   # modules left out of "all-linear" on both sides, where PEFT cannot serve
    exclude_why: str = ""                 #   as the oracle
    eager_oracle: dict = field(default_factory=dict)   # module name -> why PEFT cannot be the oracle there

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()

    def example_inputs(self, seed: int = 0) -> dict:
        return self.inputs(2, self.length, seed)

    def other_inputs(self) -> dict:
        return self.inputs(3, self.length + 3, 1)

    @property
    def other_shape(self) -> str:
        return ", ".join(f"{name} {tuple(value.shape)}" for name, value in self.other_inputs().items())

    @staticmethod
    def constants(model: nn.Module) -> dict:
        """`use_cache=False` where the model takes it, by name or through `**kwargs` (a cache object is not a graph
        output)."""
        parameters = inspect.signature(model.forward).parameters
        takes = "use_cache" in parameters or (hasattr(model.config.get_text_config(), "use_cache") and any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()))
        return {"use_cache": False} if takes else {}


def causal(model_class, config_class, **overrides) -> Callable[[], nn.Module]:
    """A decoder-only LM from TEXT's sizes with `overrides`."""
    return lambda: model_class(config_class(**{**TEXT, **overrides}))


def moe(model_class, config_class, **overrides) -> Callable[[], nn.Module]:
    def build():
        config = config_class(**{**TEXT, **overrides})
        config._experts_implementation = EXPERTS
        return model_class(config)
    return build


def built(model_class, config_class, **fields) -> Callable[[], nn.Module]:
    return lambda: model_class(config_class(**fields))


BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
VIT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=48, num_labels=5)
BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4)
WAV2VEC2 = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
                num_conv_pos_embedding_groups=4, pad_token_id=0)
MAMBA2 = dict(hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=2, chunk_size=8,
              num_hidden_layers=2, vocab_size=VOCAB)


IMAGE_TOKEN, VISION_START, VISION_END = VOCAB - 1, VOCAB - 2, VOCAB - 3


def llava_inputs(batch: int, length: int, seed: int) -> dict:
    # 16 image tokens (a 32×32 image in 8×8 patches, CLS dropped), then the text
    text = torch.randint(3, VOCAB - 3, (batch, length), generator=_generator(seed))
    return {"input_ids": torch.cat([torch.full((batch, 16), IMAGE_TOKEN), text], 1),
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=_generator(seed + 1))}


def llava() -> nn.Module:
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**CLIP_VISION), text_config=tf.LlamaConfig(**TEXT),
        image_token_index=IMAGE_TOKEN, image_seq_length=16, vision_feature_layer=-1))


def qwen2_5_vl_inputs(batch: int, length: int, seed: int) -> dict:
    # per image a 4×4 grid of patches (3·2·4·4 values each), merged 2×2 into 4 image tokens
    text = torch.randint(3, VOCAB - 3, (batch, length), generator=_generator(seed))
    image = torch.tensor([VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END]).expand(batch, -1)
    return {"input_ids": torch.cat([image, text], 1),
            "pixel_values": torch.randn(batch * 16, 3 * 2 * 4 * 4, generator=_generator(seed + 1)),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * batch)}


def qwen2_5_vl() -> nn.Module:
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]}
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=8, out_hidden_size=32, fullatt_block_indexes=[1])
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
        text_config={**TEXT, "head_dim": 8, "rope_parameters": rope}, vision_config=vision,
        image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END))


def whisper(batch: int, length: int, seed: int) -> dict:
    # the encoder takes exactly 2 * max_source_positions frames
    return {"input_features": torch.randn(batch, 8, 32, generator=_generator(seed)),
            "decoder_input_ids": torch.randint(3, VOCAB, (batch, length), generator=_generator(seed + 1))}


DT_PROJ = {"dt_proj": "transformers reads dt_proj.weight directly (`self.dt_proj.weight @ time_step`): PEFT's "
                      "LoRA there is dead"}
PEFT_POSITIONS = {"kinds_parity": "PEFT cannot serve: its embedding wrapper looks up the positional embedding's "
                                  "first argument (not ids) and raises; lora_fx's side is not checked by another "
                                  "oracle yet"}
ARCHITECTURES = [
    # Llama family and other decoder-only LMs
    Arch("llama", causal(tf.LlamaForCausalLM, tf.LlamaConfig), ci=True),
    Arch("mistral", causal(tf.MistralForCausalLM, tf.MistralConfig)),
    Arch("qwen2", causal(tf.Qwen2ForCausalLM, tf.Qwen2Config)),
    Arch("qwen3", causal(tf.Qwen3ForCausalLM, tf.Qwen3Config, head_dim=8)),
    Arch("gemma", causal(tf.GemmaForCausalLM, tf.GemmaConfig, head_dim=8)),
    Arch("gemma2", causal(tf.Gemma2ForCausalLM, tf.Gemma2Config, head_dim=8, sliding_window=4)),
    Arch("gemma3", causal(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, head_dim=8, sliding_window=4)),
    Arch("phi", causal(tf.PhiForCausalLM, tf.PhiConfig)),
    Arch("phi3", causal(tf.Phi3ForCausalLM, tf.Phi3Config)),
    Arch("gpt2", causal(tf.GPT2LMHeadModel, tf.GPT2Config, n_positions=64), ci=True),
    Arch("gptj", causal(tf.GPTJForCausalLM, tf.GPTJConfig, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                        n_positions=64)),
    Arch("gpt_neox", causal(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig)),
    Arch("gpt_neo", causal(tf.GPTNeoForCausalLM, tf.GPTNeoConfig, num_layers=2, num_heads=4,
                           attention_types=[[["global", "local"], 1]], window_size=4)),
    Arch("gpt_bigcode", causal(tf.GPTBigCodeForCausalLM, tf.GPTBigCodeConfig, n_embd=32, n_layer=2, n_head=4,
                               n_positions=64)),
    Arch("falcon", causal(tf.FalconForCausalLM, tf.FalconConfig)),
    Arch("bloom", causal(tf.BloomForCausalLM, tf.BloomConfig, n_layer=2, n_head=4)),
    Arch("mpt", causal(tf.MptForCausalLM, tf.MptConfig, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)),
    Arch("opt", causal(tf.OPTForCausalLM, tf.OPTConfig, ffn_dim=48, word_embed_proj_dim=32),
         eager_oracle={"embed_positions": "OPT's positional embedding takes the attention mask: PEFT's embedding "
                                          "wrapper looks the mask up as ids"}),
    Arch("codegen", causal(tf.CodeGenForCausalLM, tf.CodeGenConfig, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                           n_positions=64, n_ctx=64)),
    Arch("stablelm", causal(tf.StableLmForCausalLM, tf.StableLmConfig)),
    Arch("starcoder2", causal(tf.Starcoder2ForCausalLM, tf.Starcoder2Config)),
    Arch("olmo", causal(tf.OlmoForCausalLM, tf.OlmoConfig)),
    Arch("olmo2", causal(tf.Olmo2ForCausalLM, tf.Olmo2Config)),
    Arch("cohere", causal(tf.CohereForCausalLM, tf.CohereConfig)),
    Arch("granite", causal(tf.GraniteForCausalLM, tf.GraniteConfig)),
    Arch("glm", causal(tf.GlmForCausalLM, tf.GlmConfig, head_dim=8)),
    Arch("smollm3", causal(tf.SmolLM3ForCausalLM, tf.SmolLM3Config)),
    # mixture of experts
    Arch("qwen2_moe", moe(tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    Arch("qwen3_moe", moe(tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, head_dim=8, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16), ci=True),
    Arch("mixtral", moe(tf.MixtralForCausalLM, tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)),
    Arch("olmoe", moe(tf.OlmoeForCausalLM, tf.OlmoeConfig, num_experts=4, num_experts_per_tok=2)),
    Arch("phimoe", moe(tf.PhimoeForCausalLM, tf.PhimoeConfig, num_local_experts=4, num_experts_per_tok=2),
         exclude=("router",), exclude_why="PhimoeTopKRouter is an nn.Linear whose forward returns a tuple; PEFT's "
                                          "LoRA Linear wrapper raises on it (`result.dtype`)"),
    Arch("deepseek_v2", moe(tf.DeepseekV2ForCausalLM, tf.DeepseekV2Config, n_routed_experts=4, n_shared_experts=1,
                            num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
                            v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4)),
    Arch("deepseek_v3", moe(tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config, n_routed_experts=4, n_shared_experts=1,
                            num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=4,
                            v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4)),
    Arch("qwen3_next", moe(tf.Qwen3NextForCausalLM, tf.Qwen3NextConfig, head_dim=8, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                           linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                           linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])),
    Arch("gpt_oss", moe(tf.GptOssForCausalLM, tf.GptOssConfig, head_dim=8, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=4)),
    Arch("granitemoe", moe(tf.GraniteMoeForCausalLM, tf.GraniteMoeConfig, num_local_experts=4,
                           num_experts_per_tok=2)),
    Arch("dbrx", moe(tf.DbrxForCausalLM, tf.DbrxConfig, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                     attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
                     ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}),
         known={"capture": "DBRX's experts loop over the experts hit (data-dependent) whatever "
                           "`_experts_implementation` says: refused with a CaptureError naming the experts modules"}),
    # state-space models and hybrids
    Arch("mamba", causal(tf.MambaForCausalLM, tf.MambaConfig, state_size=8, expand=2, conv_kernel=4),
         peft_mamba_out_proj=True, eager_oracle=DT_PROJ),
    Arch("mamba2", built(tf.Mamba2ForCausalLM, tf.Mamba2Config, **MAMBA2), ci=True, peft_mamba_out_proj=True),
    Arch("falcon_mamba", causal(tf.FalconMambaForCausalLM, tf.FalconMambaConfig, state_size=8, expand=2,
                                conv_kernel=4), peft_mamba_out_proj=True, eager_oracle=DT_PROJ),
    Arch("jamba", moe(tf.JambaForCausalLM, tf.JambaConfig, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                      expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                      mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False), eager_oracle=DT_PROJ),
    Arch("falcon_h1", causal(tf.FalconH1ForCausalLM, tf.FalconH1Config, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4,
                             mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8),
         peft_mamba_out_proj=True),
    Arch("bamba", causal(tf.BambaForCausalLM, tf.BambaConfig, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                         mamba_d_state=8, mamba_chunk_size=8, attn_layer_indices=[1])),
    # encoder-decoders
    Arch("t5", built(tf.T5ForConditionalGeneration, tf.T5Config, **T5), seq2seq, ci=True),
    Arch("mt5", built(tf.MT5ForConditionalGeneration, tf.MT5Config, **T5), seq2seq),
    Arch("bart", built(tf.BartForConditionalGeneration, tf.BartConfig, **BART), seq2seq, known=PEFT_POSITIONS),
    Arch("mbart", built(tf.MBartForConditionalGeneration, tf.MBartConfig, **BART), seq2seq, known=PEFT_POSITIONS),
    Arch("pegasus", built(tf.PegasusForConditionalGeneration, tf.PegasusConfig, **BART), seq2seq,
         known=PEFT_POSITIONS),
    Arch("marian", built(tf.MarianMTModel, tf.MarianConfig, **BART), seq2seq, known=PEFT_POSITIONS),
    Arch("whisper", built(tf.WhisperForConditionalGeneration, tf.WhisperConfig, vocab_size=VOCAB, d_model=32,
                          encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16,
                          max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          decoder_start_token_id=1), whisper,
         known={"kinds_parity": "PEFT cannot serve: the encoder reads `self.conv1.stride`, which PEFT's conv wrapper "
                                "lacks (AttributeError); lora_fx's side is not checked by another oracle yet"}),
    # encoders (BERT-likes)
    Arch("bert", built(tf.BertForMaskedLM, tf.BertConfig, **BERT)),
    Arch("roberta", built(tf.RobertaForMaskedLM, tf.RobertaConfig, **{**BERT, "pad_token_id": 1})),
    Arch("xlm_roberta", built(tf.XLMRobertaForMaskedLM, tf.XLMRobertaConfig, **{**BERT, "pad_token_id": 1})),
    Arch("distilbert", built(tf.DistilBertForMaskedLM, tf.DistilBertConfig, vocab_size=VOCAB, dim=32, n_layers=2,
                             n_heads=4, hidden_dim=48, max_position_embeddings=64, pad_token_id=0)),
    Arch("albert", built(tf.AlbertForMaskedLM, tf.AlbertConfig, **BERT, embedding_size=16)),
    Arch("electra", built(tf.ElectraForMaskedLM, tf.ElectraConfig, **BERT, embedding_size=16)),
    Arch("deberta_v2", built(tf.DebertaV2ForMaskedLM, tf.DebertaV2Config, **BERT)),
    Arch("modernbert", built(tf.ModernBertForMaskedLM, tf.ModernBertConfig, vocab_size=VOCAB, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, local_attention=4, pad_token_id=0)),
    Arch("bert_classifier", built(tf.BertForSequenceClassification, tf.BertConfig, **BERT, num_labels=3)),
    # vision
    Arch("vit", built(tf.ViTForImageClassification, tf.ViTConfig, **VIT), images(32), ci=True),
    Arch("deit", built(tf.DeiTForImageClassification, tf.DeiTConfig, **VIT), images(32)),
    Arch("beit", built(tf.BeitForImageClassification, tf.BeitConfig, **VIT), images(32)),
    Arch("dinov2", built(tf.Dinov2Model, tf.Dinov2Config, **VIT), images(32), last_hidden_state),
    Arch("swin", built(tf.SwinForImageClassification, tf.SwinConfig, image_size=32, patch_size=4, embed_dim=16,
                       depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5), images(32)),
    Arch("clip", built(tf.CLIPModel, tf.CLIPConfig, text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                       projection_dim=16), text_and_images(32), logits_per_image),
    Arch("siglip", built(tf.SiglipModel, tf.SiglipConfig, text_config=CLIP_TEXT, vision_config=CLIP_VISION),
         text_and_images(32), logits_per_image,
         eager_oracle={"head.attention.out_proj": "the pooling head's nn.MultiheadAttention reads out_proj.weight "
                                                  "directly (F.multi_head_attention_forward): PEFT's LoRA there is "
                                                  "dead"}),
    # vision-language
    Arch("llava", llava, llava_inputs),
    Arch("qwen2_5_vl", qwen2_5_vl, qwen2_5_vl_inputs,
         known={"capture": "the vision tower's window index converts grid sizes to Python ints (data-dependent): "
                           "refused with a CaptureError naming the code line"}),
    # audio
    Arch("wav2vec2", built(tf.Wav2Vec2ForCTC, tf.Wav2Vec2Config, **WAV2VEC2), audio, length=16),
    Arch("hubert", built(tf.HubertForCTC, tf.HubertConfig, **WAV2VEC2), audio, length=16),
]

BY_NAME = {arch.name: arch for arch in ARCHITECTURES}
