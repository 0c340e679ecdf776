"""What every hf-influence artifact on the Hub shares: its tags and the card templates in `model_cards/`."""

from importlib import resources

# The Hub tag on every artifact this library writes (networks, score tables, trainer model cards): one tag, so that
# one search finds them all.
HUB_TAG = "hf_influence"
TAGS = [HUB_TAG, "data-selection", "influence-functions"]


def card_template(name: str) -> str:
    """The text of a card template in `model_cards/` (installed as the package `hf_influence.model_cards`)."""
    return resources.files("hf_influence.model_cards").joinpath(name).read_text()
