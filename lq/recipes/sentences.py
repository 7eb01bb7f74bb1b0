"""Real English sentences for the MiniLM recipe: written for this repository (varied topics, lengths and
styles, as a sentence encoder meets them). The first ``num_calibration`` calibrate; the rest evaluate."""

from __future__ import annotations

SENTENCES: tuple[str, ...] = (
    "The train to Edinburgh was delayed by forty minutes because of a signal failure near York.",
    "She added a pinch of salt to the boiling water before dropping in the pasta.",
    "Interest rates were left unchanged at the central bank's meeting on Thursday.",
    "My laptop battery drains quickly whenever the video call has more than six people.",
    "The museum reopened its Egyptian gallery after a two-year renovation.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please remember to water the tomatoes while I'm away next week.",
    "The referee showed a red card in the final minute of extra time.",
    "A gentle rain fell over the harbour as the fishing boats came in.",
    "The new firmware update fixes a bug that caused the printer to jam.",
    "He spent the whole afternoon reading a biography of Marie Curie.",
    "Our flight was cancelled, so we booked a hotel near the airport.",
    "The recipe calls for two cups of flour, three eggs and a cup of milk.",
    "Volcanic ash can disrupt air traffic across an entire continent.",
    "The committee will publish its final report at the end of March.",
    "Children learn languages faster when they hear them every day.",
    "The database query timed out because an index was missing.",
    "I can't find my keys; did you see where I left them?",
    "The orchestra rehearsed the second movement until it sounded right.",
    "Glaciers in the Alps have lost a large part of their volume since 1900.",
    "The startup raised twelve million dollars in its first funding round.",
    "Wear a helmet when you ride your bike through the city.",
    "The novel follows three generations of a family living in Lagos.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    # ---- evaluation sentences below (never seen during calibration)
    "The bus to Glasgow left late because of a broken signal outside Newcastle.",
    "A cheap laptop rarely has a good keyboard.",
    "The central bank raised interest rates by a quarter of a point.",
    "Boil the potatoes for twenty minutes, then mash them with butter.",
    "The goalkeeper saved a penalty in the last minute of the match.",
    "Plants use sunlight, water and carbon dioxide to make sugar.",
    "The art gallery is closed on Mondays and public holidays.",
    "Our software release was postponed until the security audit is finished.",
    "The storm knocked out power to thousands of homes along the coast.",
    "She practises the violin for an hour every morning before school.",
    "Dolphins communicate with each other using clicks and whistles.",
    "The city council approved a new cycle lane on the main road.",
    "How long does it take to get from the station to the museum?",
    "The stock market fell sharply after the disappointing earnings report.",
    "Please restart the router if the internet connection keeps dropping.",
    "The ancient Romans built roads that are still used today.",
    "He forgot his umbrella and got soaked on the way home.",
    "The vaccine trial enrolled more than thirty thousand volunteers.",
    "A good night's sleep helps you concentrate at work.",
    "The hotel room had a beautiful view of the mountains.",
    "The compiler reported an error on line forty-two of the file.",
    "Bees are essential for pollinating many of the crops we eat.",
    "They moved to a small village in the countryside after retiring.",
    "The library lends e-books as well as printed books.",
    "The chef recommended the grilled fish with lemon and herbs.",
    "Heavy snow closed the mountain pass for three days.",
    "The team celebrated their victory with a parade through the city.",
    "Solar panels on the roof now provide most of the house's electricity.",
    "My grandmother tells the best stories about her childhood.",
    "The lecture on quantum mechanics was hard to follow.",
    "Traffic was light on the motorway early on Sunday morning.",
    "The new phone has a larger screen and a better camera.",
    "The river burst its banks after a week of heavy rain.",
    "You should back up your files before installing the update.",
    "The detective finally found the missing letter behind the bookcase.",
    "Learning to cook is one of the most useful skills you can have.",
)


def sentence_splits(num_calibration: int = 24, num_eval: int | None = None) -> dict[str, list[str]]:
    """``{"calibration": first num_calibration sentences, "eval": the next num_eval (default: all the rest)}``."""
    n = len(SENTENCES)
    if not 0 < int(num_calibration) < n:
        raise ValueError(f"num_calibration must be in (0, {n}), got {num_calibration!r}")
    rest = list(SENTENCES[int(num_calibration) :])
    if num_eval is not None:
        if int(num_eval) <= 0:
            raise ValueError(f"num_eval must be positive or None, got {num_eval!r}")
        rest = rest[: int(num_eval)]
    return {"calibration": list(SENTENCES[: int(num_calibration)]), "eval": rest}
