"""LaViDa's bilinear pooling of each view's projected token map."""

import torch.nn.functional as F


def pool_view_features(features, pooled_size):
    """Bilinear resize (align_corners=False) of each view's s x s token map to pooled_size x pooled_size.

    features: (V, s*s, E) -> (V, pooled_size^2, E); pooled_size = s returns the features as they are.
    """
    views, tokens, dim = features.shape
    side = int(round(tokens**0.5))
    if pooled_size == side:  # unpooled (LaViDa's NOT_ALWASY_DO_2DPOOL and single-view paths never call the pooling)
        return features
    grid = features.transpose(1, 2).reshape(views, dim, side, side)  # (V, E, s, s)
    pooled = F.interpolate(grid, size=(pooled_size, pooled_size), mode="bilinear", align_corners=False)
    return pooled.flatten(2).transpose(1, 2)  # (V, p*p, E)
