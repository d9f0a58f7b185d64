"""LaViDa-LLaDA with SHIRG high-resolution token selection, HF-native."""

from .configuration_lavida_shirg import DreamTextConfig, LladaTextConfig, ShirgConfig
