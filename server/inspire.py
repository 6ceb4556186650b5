"""The published page's "Tool Parameter Inspires": example inputs, answered in Tool/Detail's `inspire`
(as Wiro does) so that clients such as the playground offer them without keeping their own copy."""

from __future__ import annotations

_ORB = "Open hands cradle a glowing, translucent orb, It is disintegrating and turning into small white spheres"

INSPIRE: tuple[dict[str, str], ...] = (
    {
        "steps": "30",
        "prompt": "Open hands cradle a glowing, translucent orb inscribed with the word \u201cBUZZ!\u201d and playful, "
                  "starry designs. The sphere radiates soft blue e13c7r1c electricity effect blue light, creating a "
                  "magical moment.",
        "negativePrompt": "bad quality video",
        "seed": "10700418",
    },
    {"prompt": _ORB},
    {
        "prompt": "The toronto cityscape model is destroyed, the cn tower structure is collapsing disintegrating or "
                  "turning bursting into small cement rubble falling down to ground. imploding buildings explode "
                  "split open apart falling over deflating",
    },
    {
        "prompt": "a man is petting a sitting dog. the dog suddenly disintegrates into dust, the man's expressions "
                  "changes to shock and he looks up and opens his mouth and shouts in fear",
    },
    {"steps": "30", "prompt": _ORB, "negativePrompt": "bad quality video"},
    {
        "prompt": "model of the whitehouse structure is collapsing disintegrating or turning bursting into pieces of "
                  "white rubble falling down to ground. whitehouse split open apart falling over deflating causing "
                  "dust cloud",
    },
    {
        "prompt": "model of the big ben clock tower structure is collapsing disintegrating or turning bursting into "
                  "pieces of rubble falling down to ground. structure split open apart falling over deflating "
                  "causing dust cloud",
    },
)
