"""Model presets by name, apart from the model code so that params checks and `--help` need no torch."""

# Architectures by name. Reference presets (base, large, huge) match facebookresearch/mae; the smaller
# ones keep its proportions for small images and CPU budgets. Patch and image size come from params.
PRESETS = {
    "micro": dict(embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                  decoder_num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16),
}

# The encoder's feature: the class token, the mean patch token, or the mean patch token of every block
# concatenated (MAEEncoder; evaluate.pool picks one).
POOLS = ("avg", "cls", "blocks")
POOL_NAMES = {"avg": "the mean of the final patch tokens", "cls": "the final class token",
              "blocks": "the mean patch token of every encoder block, concatenated"}
