"""Attention modules: SDPA equals a plain softmax implementation; transformer plumbing and errors."""
import pytest
import torch

from ldm.errors import ConfigError
from ldm.modules.attention import BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer
from ldm.modules.diffusionmodules.blocks import AttentionBlock

TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ · d^-½) V over the last two axes, materialising the full score matrix."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ value


def plain_cross_attention(module: CrossAttention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The original einsum formulation of CrossAttention.forward, using ``module``'s weights."""
    context = x if context is None else context
    heads = module.heads

    def split(tokens):
        batch, length, width = tokens.shape
        return tokens.reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3)

    out = plain_attention(split(module.to_q(x)), split(module.to_k(context)), split(module.to_v(context)))
    batch, _, length, dim_head = out.shape
    return module.to_out(out.permute(0, 2, 1, 3).reshape(batch, length, heads * dim_head))


def randomise_zero_parameters(module: torch.nn.Module) -> None:
    """Give zero-initialised parameters (residual heads, norm biases) random values so they carry signal."""
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("with_context", [False, True])
def test_cross_attention_sdpa_equals_plain_softmax(dtype, heads, with_context):
    torch.manual_seed(heads)
    query_dim, context_dim = 32, 24
    module = CrossAttention(query_dim, context_dim if with_context else None, heads=heads, dim_head=8).to(dtype)
    x = torch.randn(2, 50, query_dim, dtype=dtype)
    context = torch.randn(2, 7, context_dim, dtype=dtype) if with_context else None
    fast = module(x, context)
    reference = plain_cross_attention(module, x, context)
    assert fast.shape == (2, 50, query_dim)
    torch.testing.assert_close(fast, reference, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])


def test_cross_attention_rejects_context_of_wrong_width():
    module = CrossAttention(32, context_dim=512, heads=2, dim_head=16)
    with pytest.raises(ConfigError, match="to_k expects 512"):
        module(torch.randn(1, 4, 32))
    with pytest.raises(ConfigError, match="the context has width 100"):
        module(torch.randn(1, 4, 32), torch.randn(1, 3, 100))


def test_feed_forward_is_plain_gelu_mlp_with_original_names():
    torch.manual_seed(0)
    ff = FeedForward(8)
    assert list(ff.state_dict()) == ["net.0.0.weight", "net.0.0.bias", "net.2.weight", "net.2.bias"]
    x = torch.randn(3, 8)
    first, second = ff.net[0][0], ff.net[2]
    expected = torch.nn.functional.gelu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(ff(x), expected)


def test_transformer_block_matches_pre_norm_formula_and_checkpointing_is_exact():
    torch.manual_seed(1)
    block = BasicTransformerBlock(32, n_heads=2, d_head=16, context_dim=12).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 5, 12, dtype=torch.float64)
    h = plain_cross_attention(block.attn1, block.norm1(x), None) + x
    h = plain_cross_attention(block.attn2, block.norm2(h), context) + h
    expected = block.ff(block.norm3(h)) + h
    out = block(x, context)
    torch.testing.assert_close(out, expected)
    (grad_plain,) = torch.autograd.grad(out.square().sum(), x)
    block.use_checkpoint = True
    out_checkpointed = block(x, context)
    (grad_checkpointed,) = torch.autograd.grad(out_checkpointed.square().sum(), x)
    torch.testing.assert_close(out_checkpointed, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_checkpointed, grad_plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spatial", [(6, 5), (4, 3, 5)])
def test_spatial_transformer_is_identity_at_init_and_flattens_voxels_in_order(spatial):
    torch.manual_seed(2)
    dims = len(spatial)
    transformer = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=12, dims=dims).double()
    x = torch.randn(2, 32, *spatial, dtype=torch.float64)
    context = torch.randn(2, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(transformer(x, context), x, rtol=0, atol=0)

    randomise_zero_parameters(transformer)
    hidden = transformer.proj_in(transformer.norm(x))
    channels_last = hidden.permute(0, *range(2, dims + 2), 1)
    tokens = transformer.transformer_blocks[0](channels_last.reshape(2, -1, 32), context)
    back = tokens.reshape(channels_last.shape).permute(0, dims + 1, *range(1, dims + 1))
    expected = transformer.proj_out(back) + x
    torch.testing.assert_close(transformer(x, context), expected)
    assert not torch.allclose(transformer(x, context), transformer(x, context + 1.0))


def test_spatial_transformer_needs_channels_divisible_by_32():
    with pytest.raises(ConfigError, match="multiple of 32"):
        SpatialTransformer(48, n_heads=3, d_head=16)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_equals_plain_softmax_in_both_channel_orders(new_order):
    torch.manual_seed(3)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order).double()
    randomise_zero_parameters(block)
    x = torch.randn(2, 64, 3, 4, 5, dtype=torch.float64)
    flat = x.reshape(2, 64, -1)
    qkv = block.qkv(block.norm(flat))
    if new_order:
        query, key, value = (part.reshape(2, 4, 16, 60) for part in qkv.chunk(3, dim=1))
    else:
        query, key, value = qkv.reshape(2, 4, 48, 60).split(16, dim=2)
    attended = plain_attention(query.transpose(-1, -2), key.transpose(-1, -2), value.transpose(-1, -2))
    expected = flat + block.proj_out(attended.transpose(-1, -2).reshape(2, 64, 60))
    torch.testing.assert_close(block(x), expected.reshape(x.shape))
