"""Write src/prefloop/data/verifiable_instructions.jsonl: hand-written tasks + drawn constraints.

Deterministic (fixed seed). Run: PYTHONPATH=src python scripts/make_verifiable_instructions.py
Each item gets 1-3 compatible constraints, drawn so that every kind is used often, length kinds
pull both ways, and the instruction copied as an answer never satisfies all its constraints.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from prefloop.constraints import Constraint, check, instruction_text

OUT = Path(__file__).resolve().parents[1] / "src/prefloop/data/verifiable_instructions.jsonl"
SEED = 20240611
HELDOUT_TOPICS = ("gardening", "music", "pets", "home", "school", "weather")

TASKS = {
    "cooking": [
        "Explain how to cook fluffy rice on the stove.",
        "Suggest a quick dinner for someone who has eggs, spinach and cheese.",
        "Why does bread dough need time to rise?",
        "Describe how to tell when a steak is done without cutting it.",
        "Give tips for keeping fresh herbs from wilting.",
        "What can I use instead of butter when baking muffins?",
        "Describe a simple tomato soup a beginner could make.",
        "How do you stop pasta from sticking together?",
        "Explain the difference between baking soda and baking powder.",
        "Plan a vegetarian lunch menu for a family of four.",
        "Is it safe to refreeze chicken that has already thawed?",
        "Tell me how to make a basic salad dressing.",
        "Why do onions make people cry when they are cut?",
        "Recommend a way to use up overripe bananas.",
        "Describe how to season a cast iron pan.",
        "What are good snacks to prepare for a long car trip?",
        "Explain how to poach an egg.",
        "Suggest ways to make vegetables more appealing to children.",
        "How should leftovers be stored so they stay fresh?",
        "Describe what makes a good pizza crust.",
    ],
    "travel": [
        "Give advice for packing light on a week-long trip.",
        "How can I avoid jet lag after a long flight?",
        "Describe what to do if you lose your passport abroad.",
        "Suggest ways to save money on hotel stays.",
        "Explain how to choose a good seat on a train.",
        "What should a first-time camper bring on an overnight trip?",
        "Recommend activities for a rainy day in a new city.",
        "Is it worth buying travel insurance for a short trip?",
        "Describe how to plan a road trip route.",
        "How do you stay safe when walking alone in an unfamiliar place?",
        "Give tips for traveling with a toddler on a plane.",
        "Explain how to learn a few useful phrases before visiting another country.",
        "What are the benefits of traveling during the off season?",
        "Suggest how to spend one day in a small coastal town.",
        "Describe how to handle a missed connecting flight.",
        "How can travelers reduce their environmental impact?",
        "Explain how to exchange money without paying high fees.",
        "Give advice for a first trip to a big music festival.",
        "What makes a hostel a good choice for young travelers?",
        "Describe how to keep valuables safe in a busy market.",
    ],
    "science": [
        "Explain why the sky looks blue during the day.",
        "How do plants turn sunlight into food?",
        "Describe what happens when water boils.",
        "Why do magnets attract some metals but not others?",
        "Explain how vaccines help the body fight disease.",
        "What causes the phases of the moon?",
        "Describe how sound travels through air.",
        "Is glass a liquid or a solid?",
        "Explain what an atom is made of.",
        "How do bees help flowers reproduce?",
        "Why does ice float on water?",
        "Describe how earthquakes happen.",
        "Explain the difference between weather and climate.",
        "What is the purpose of the scientific method?",
        "How does a rainbow form after rain?",
        "Describe how the heart pumps blood around the body.",
        "Explain why we have seasons on Earth.",
        "What makes some materials conduct electricity?",
        "How do fossils form over millions of years?",
        "Describe what a black hole is in simple terms.",
    ],
    "history": [
        "Describe why the ancient Egyptians built pyramids.",
        "Explain how the printing press changed the spread of ideas.",
        "What was daily life like for a medieval farmer?",
        "Why did the Roman Empire build so many roads?",
        "Describe the importance of the Silk Road for trade.",
        "How did the invention of the telephone change communication?",
        "Explain why the first moon landing was a major achievement.",
        "Did the Vikings really wear horned helmets?",
        "Describe how people kept time before mechanical clocks.",
        "What role did lighthouses play for sailors in the past?",
        "Explain how the steam engine affected factories.",
        "Why were castles built on hills?",
        "Describe how ancient people preserved food without fridges.",
        "How did the first public libraries start?",
        "Explain what made the Olympic Games important in ancient Greece.",
        "Describe how paper money replaced coins in many places.",
        "What did explorers use to navigate before satellites?",
        "Why did many cities grow up next to rivers?",
        "Explain how the bicycle changed the lives of ordinary people.",
        "Describe what a day at a one-room schoolhouse might have been like.",
    ],
    "work": [
        "Give advice for preparing for a job interview.",
        "How can a team run shorter and more useful meetings?",
        "Describe how to write a polite email asking for a deadline extension.",
        "What should a new manager do in their first week?",
        "Explain how to give helpful feedback to a coworker.",
        "Suggest ways to stay focused while working from home.",
        "How do you ask your boss for a raise?",
        "Describe how to organize a cluttered to-do list.",
        "Is it a good idea to check work email on weekends?",
        "Explain how to handle a disagreement with a colleague.",
        "Give tips for making a strong first impression at a new job.",
        "What makes a presentation easy for an audience to follow?",
        "Describe how to say no to extra work without sounding rude.",
        "How can someone switch careers in their thirties?",
        "Explain how to take useful notes during a meeting.",
        "Suggest ways to avoid burnout during a busy season.",
        "Describe the qualities of a good mentor.",
        "How should you prepare for a performance review?",
        "Explain how to welcome a new person joining the team.",
        "Give advice for writing a short and clear resume.",
    ],
    "health": [
        "Suggest easy ways to drink more water during the day.",
        "How much sleep does a teenager need and why?",
        "Describe a simple stretching routine for office workers.",
        "Explain why breakfast matters for some people.",
        "What are gentle ways to start running as a beginner?",
        "Give tips for reducing stress before an exam.",
        "Is it bad to sit for many hours every day?",
        "Describe how to build a habit of regular exercise.",
        "Explain why washing hands helps prevent illness.",
        "How can someone cut down on sugary drinks?",
        "Suggest healthy snacks for an afternoon energy dip.",
        "Describe how to protect your skin on a sunny day.",
        "What can help a person fall asleep faster?",
        "Explain why posture matters when using a computer.",
        "Give advice for staying active during cold months.",
        "How do you know if you are drinking enough water?",
        "Describe the benefits of taking short walks after meals.",
        "Explain how to make a balanced plate at dinner.",
        "Suggest ways to rest your eyes during screen work.",
        "What are simple breathing exercises for calming down?",
    ],
    "sports": [
        "Explain the basic rules of basketball.",
        "How can a beginner improve their swimming technique?",
        "Describe how to warm up before playing football.",
        "Why do marathon runners eat a lot of pasta before a race?",
        "Give tips for choosing a good pair of running shoes.",
        "What makes a great team captain?",
        "Describe how to serve in tennis.",
        "Is it better to stretch before or after exercise?",
        "Explain how scoring works in volleyball.",
        "How do cyclists ride safely in city traffic?",
        "Suggest ways for a child to get into a new sport.",
        "Describe the job of a goalkeeper in soccer.",
        "Explain why rest days matter for athletes.",
        "What should someone pack for a day of hiking?",
        "How can a team recover after losing a big game?",
        "Describe how to throw a frisbee straight.",
        "Explain what a personal best means in athletics.",
        "Give advice for learning to ski as an adult.",
        "Why do some athletes train at high altitude?",
        "Describe how a relay race works.",
    ],
    "money": [
        "Explain how to make a simple monthly budget.",
        "Why is it smart to keep an emergency fund?",
        "Describe how interest on a savings account works.",
        "Give tips for spending less on groceries.",
        "How can a student avoid getting into debt?",
        "What is the difference between a debit card and a credit card?",
        "Suggest ways to save for a big purchase.",
        "Is renting always worse than buying a home?",
        "Explain how to compare two phone plans.",
        "Describe how to teach a child the value of money.",
        "How can someone track where their money goes each month?",
        "Give advice for splitting bills with roommates.",
        "Explain what a credit score is used for.",
        "Why do prices tend to rise over time?",
        "Describe how to resist impulse buying online.",
        "What should you check before signing a lease?",
        "Suggest ways to earn a little extra income on weekends.",
        "Explain why paying off high-interest debt first makes sense.",
        "How do you plan a budget for a holiday trip?",
        "Describe how to pick a good bank account.",
    ],
    "technology": [
        "Explain how to create a strong password.",
        "What is cloud storage and why do people use it?",
        "Describe how to speed up a slow laptop.",
        "How does a search engine find web pages?",
        "Give tips for spotting a phishing email.",
        "Explain what an app update usually does.",
        "Is it safe to use public Wi-Fi for online banking?",
        "Describe how to back up photos from a phone.",
        "What is the difference between hardware and software?",
        "How do noise-cancelling headphones work?",
        "Suggest ways to reduce screen time in the evening.",
        "Explain how a GPS receiver knows where you are.",
        "Describe what a web browser does.",
        "How can an older relative learn to video call?",
        "Explain why software needs regular security patches.",
        "What should you do before selling an old phone?",
        "Describe how a QR code stores information.",
        "Give advice for choosing a first smartphone for a teenager.",
        "How does two-factor sign-in protect an account?",
        "Explain what a computer virus is.",
    ],
    "nature": [
        "Describe why leaves change color in autumn.",
        "How do birds know where to fly when they migrate?",
        "Explain why coral reefs matter for the ocean.",
        "What should you do if you meet a bear on a trail?",
        "Describe how rivers shape the land over time.",
        "Why do some animals hibernate in winter?",
        "Explain how forests help clean the air.",
        "Are bats really blind?",
        "Describe the life cycle of a butterfly.",
        "How do mountains form?",
        "Explain why wetlands are important habitats.",
        "What causes a wildfire to spread quickly?",
        "Describe how wolves live and hunt in packs.",
        "How do desert plants survive with little water?",
        "Explain why bees are important for farms.",
        "Describe what you might see in a tide pool.",
        "Why do some trees lose their leaves while others do not?",
        "Explain how a waterfall forms.",
        "How can people help protect songbirds?",
        "Describe how a seed grows into a tree.",
    ],
    "gardening": [
        "How often should a young tomato plant be watered?",
        "Describe how to start a small herb garden on a windowsill.",
        "Explain how compost is made from kitchen scraps.",
        "What are easy vegetables for a first-time grower?",
        "Suggest ways to keep slugs away from lettuce.",
        "Describe how to plant a tulip bulb in the fall.",
        "Is it fine to water plants in the evening?",
        "Explain why some plants need full sun.",
        "How do you repot a houseplant that has outgrown its container?",
        "Give tips for growing strawberries in a pot.",
        "Describe how to prune a rose bush.",
        "What does mulch do for garden soil?",
        "Explain how to save seeds from sunflowers.",
        "Suggest flowers that attract butterflies.",
        "How can a balcony be turned into a small garden?",
        "Describe signs that a plant is getting too much water.",
        "Explain how raised beds help gardeners.",
        "What should be done in a garden before the first frost?",
        "Give advice for growing herbs indoors in winter.",
        "Describe how to care for a new lawn.",
    ],
    "music": [
        "How can an adult start learning the piano?",
        "Describe what makes a song catchy.",
        "Explain the difference between rhythm and melody.",
        "Give tips for practicing guitar every day.",
        "What does a conductor do in an orchestra?",
        "Describe how to prepare for a first singing performance.",
        "Is it too late to learn an instrument at fifty?",
        "Explain how a drum makes sound.",
        "Suggest ways to discover new bands.",
        "How do musicians keep in time when playing together?",
        "Describe the role of a bass player in a band.",
        "Explain why some chords sound sad.",
        "What should a beginner look for in a first violin?",
        "Give advice for writing lyrics for a short song.",
        "Describe how to care for a wooden instrument.",
        "How can listening to music help with studying?",
        "Explain what a music producer does.",
        "Suggest how to host a small living room concert.",
        "Describe what happens during a band rehearsal.",
        "How do people learn to read sheet music?",
    ],
    "pets": [
        "How do you house-train a new puppy?",
        "Describe how to choose the right food for an older cat.",
        "Explain why dogs need daily walks.",
        "What should a family consider before adopting a rabbit?",
        "Give tips for keeping a goldfish tank clean.",
        "Describe how to introduce a new cat to a resident dog.",
        "Is it okay to give a dog table scraps?",
        "Explain how to trim a cat's claws safely.",
        "How can you tell if a hamster is happy?",
        "Suggest indoor games to play with a bored dog.",
        "Describe what a parrot needs to stay healthy.",
        "Explain why cats knead with their paws.",
        "What should go into a first aid kit for pets?",
        "Give advice for traveling by car with a nervous dog.",
        "Describe how to help a pet stay calm during fireworks.",
        "How often should a dog visit the vet?",
        "Explain how to teach a dog to sit.",
        "Suggest ways to keep an indoor cat active.",
        "Describe how to prepare a home for a new kitten.",
        "What are signs that a pet might be sick?",
    ],
    "home": [
        "How do you unclog a slow bathroom sink?",
        "Describe how to arrange a small kitchen so it feels roomy.",
        "Explain how to hang a picture frame straight.",
        "Give tips for keeping a home cool in summer without air conditioning.",
        "What is the best way to clean a window without streaks?",
        "Describe how to fix a squeaky door hinge.",
        "Is it worth replacing old light bulbs with LED ones?",
        "Explain how to remove a coffee stain from a carpet.",
        "Suggest ways to make a tiny bedroom feel larger.",
        "How often should smoke alarm batteries be checked?",
        "Describe a weekly cleaning routine for a busy person.",
        "Explain how to patch a small hole in a wall.",
        "What can be done about a musty smell in a closet?",
        "Give advice for painting a room for the first time.",
        "Describe how to reduce clutter in a garage.",
        "How can a household use less electricity?",
        "Explain how to prepare a home before a long holiday.",
        "Suggest ways to childproof a living room.",
        "Describe how to choose curtains for a sunny room.",
        "What tools should every home have?",
    ],
    "school": [
        "How can a student remember vocabulary for a language test?",
        "Describe a good routine for doing homework.",
        "Explain how to write a clear essay introduction.",
        "Give tips for speaking up in class discussions.",
        "What makes a study group work well?",
        "Describe how to prepare a science fair project.",
        "Is it better to study in short sessions or long ones?",
        "Explain how to take notes from a textbook chapter.",
        "Suggest ways to make math practice less boring.",
        "How should a student plan for a week of exams?",
        "Describe how to give a short class presentation.",
        "Explain why reading for fun helps with school.",
        "What should a new student do on the first day at a new school?",
        "Give advice for asking a teacher for help.",
        "Describe how to check sources for a research report.",
        "How can parents support a child learning to read?",
        "Explain how flashcards help with memory.",
        "Suggest ways to stay organized with many assignments.",
        "Describe how to work well on a group project.",
        "How do you recover after a bad test grade?",
    ],
    "weather": [
        "How does a thunderstorm form?",
        "Describe how to stay safe during a heat wave.",
        "Explain what causes fog in the morning.",
        "Give tips for driving in heavy snow.",
        "How is a hurricane different from a tornado?",
        "Describe how weather forecasters predict rain.",
        "Is it possible for it to be too cold to snow?",
        "Explain why hail can fall in summer.",
        "How should people prepare for a power cut during a storm?",
        "Suggest outdoor clothing for a windy and wet day.",
        "Describe what a weather front is.",
        "Explain how humidity makes hot days feel worse.",
        "What does a barometer measure?",
        "Give advice for walking safely on icy sidewalks.",
        "Describe how a rainbow differs from a halo around the sun.",
        "How do clouds get their shapes?",
        "Explain why coastal towns often have milder winters.",
        "Suggest ways to protect a garden from frost.",
        "Describe what happens during a monsoon season.",
        "How can you tell a storm is getting closer?",
    ],
}

# Words that fit each topic; drawn for keywords:existence and keywords:frequency (at least).
KEYWORDS = {
    "cooking": ["flavor", "kitchen", "simple", "fresh", "heat", "taste", "minutes"],
    "travel": ["journey", "plan", "local", "budget", "comfort", "airport", "map"],
    "science": ["energy", "example", "experiment", "nature", "light", "particles", "process"],
    "history": ["century", "people", "change", "ancient", "trade", "record", "past"],
    "work": ["team", "goal", "calm", "respect", "progress", "schedule", "clear"],
    "health": ["body", "routine", "doctor", "rest", "energy", "habit", "balance"],
    "sports": ["practice", "coach", "team", "goal", "training", "focus", "fun"],
    "money": ["savings", "plan", "bank", "goal", "future", "monthly", "cost"],
    "technology": ["device", "safe", "update", "data", "screen", "account", "online"],
    "nature": ["habitat", "season", "animals", "earth", "water", "balance", "wild"],
    "gardening": ["soil", "sunlight", "roots", "season", "patience", "water", "leaves"],
    "music": ["practice", "sound", "rhythm", "ear", "joy", "notes", "patience"],
    "pets": ["patience", "treat", "vet", "gentle", "routine", "trust", "play"],
    "home": ["tools", "safe", "simple", "space", "weekend", "clean", "budget"],
    "school": ["teacher", "practice", "focus", "notes", "goal", "schedule", "calm"],
    "weather": ["temperature", "safe", "wind", "forecast", "air", "clouds", "season"],
}
# Words a natural answer on the topic is likely to use, so avoiding them takes effort.
FORBIDDEN = {
    "cooking": ["cook", "food", "recipe", "delicious", "add"],
    "travel": ["trip", "travel", "hotel", "money", "time"],
    "science": ["science", "because", "scientists", "energy", "called"],
    "history": ["history", "people", "time", "important", "ancient"],
    "work": ["work", "job", "boss", "meeting", "time"],
    "health": ["health", "healthy", "body", "water", "exercise"],
    "sports": ["game", "team", "sport", "player", "ball"],
    "money": ["money", "save", "pay", "budget", "bank"],
    "technology": ["computer", "phone", "internet", "app", "device"],
    "nature": ["nature", "animals", "trees", "water", "environment"],
    "gardening": ["plant", "plants", "garden", "water", "soil"],
    "music": ["music", "song", "play", "instrument", "notes"],
    "pets": ["pet", "dog", "cat", "animal", "owner"],
    "home": ["home", "house", "room", "clean", "easy"],
    "school": ["school", "student", "study", "class", "teacher"],
    "weather": ["weather", "rain", "cold", "storm", "temperature"],
}
GENERIC_FORBIDDEN = ["very", "really", "also", "just", "important", "good", "many", "things"]
END_PHRASES = [
    "Is there anything else I can help with?",
    "Hope this helps.",
    "Let me know if you have any other questions.",
    "That is all for now.",
    "Thanks for reading.",
    "Good luck!",
    "Have a great day.",
]
FIRST_WORDS = ["also", "next", "finally", "however", "then", "remember", "another"]
RARE_LETTERS = ["z", "q", "x", "j", "k", "v"]
TASK_VERBS = {"describe", "explain", "suggest", "recommend", "someone", "should", "people"}

# How often each kind is drawn (relative weights); every kind lands at least 10 times.
# Kinds a 135M chat model satisfies some of the time (bench: 20-80 % on the train split) weigh
# more, so a model of that size can learn from the set; the rest still land at least 10 times.
WEIGHTS = {
    "length_constraints:number_words": 80,
    "length_constraints:number_sentences": 50,
    "length_constraints:number_paragraphs": 13,
    "length_constraints:nth_paragraph_first_word": 11,
    "keywords:existence": 70,
    "keywords:forbidden_words": 55,
    "keywords:frequency": 35,
    "keywords:letter_frequency": 13,
    "punctuation:no_comma": 60,
    "detectable_format:title": 25,
    "startend:quotation": 20,
    "detectable_content:postscript": 60,
    "detectable_format:number_bullet_lists": 45,
    "detectable_format:multiple_sections": 13,
    "startend:end_checker": 50,
    "detectable_format:json_format": 11,
    "change_case:english_lowercase": 13,
    "change_case:english_capital": 13,
    "detectable_format:constrained_response": 11,
    "detectable_content:number_placeholders": 11,
    "detectable_format:number_highlighted_sections": 11,
}
LENGTH = {k for k in WEIGHTS if k.startswith("length_constraints:")}
STRUCTURE = {
    "detectable_format:number_bullet_lists",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word",
}
CASES = {"change_case:english_lowercase", "change_case:english_capital"}
# What JSON output can still satisfy sensibly.
JSON_OK = {
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "keywords:letter_frequency",
    "length_constraints:number_words",
    "punctuation:no_comma",
    "change_case:english_lowercase",
}
YES_NO = re.compile(r"^(Is|Are|Can|Should|Does|Do|Did|Will|Would|Could)\b")


def compatible(kinds: list[str], new: str) -> bool:
    """Whether one answer can reasonably satisfy ``new`` together with ``kinds``."""
    have = set(kinds) | {new}
    if new in kinds or len(have & LENGTH) > 1 or len(have & STRUCTURE) > 1 or have >= CASES:
        return False
    if "detectable_format:json_format" in have and not have <= JSON_OK | {
        "detectable_format:json_format"
    }:
        return False
    constrained = "detectable_format:constrained_response" in have
    lower = "change_case:english_lowercase" in have
    return not (constrained and have & CASES) and not (
        lower and "detectable_format:multiple_sections" in have
    )


def draw_args(kind: str, topic: str, task: str, rng: random.Random, taken: set[str]) -> dict:
    """Arguments for one kind; ``taken`` holds words already used so none are both required
    and forbidden."""
    task_words = set(re.findall(r"\w+", task.lower()))
    if kind == "length_constraints:number_words":
        if rng.random() < 0.5:
            return {"num_words": rng.choice([30, 40, 50, 60]), "relation": "less than"}
        return {"num_words": rng.choice([60, 80, 100, 120]), "relation": "at least"}
    if kind == "length_constraints:number_sentences":
        if rng.random() < 0.5:
            return {"num_sentences": rng.choice([3, 4, 5]), "relation": "less than"}
        return {"num_sentences": rng.choice([4, 5, 6, 8]), "relation": "at least"}
    if kind == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.choice([2, 2, 3, 4, 5])}
    if kind == "length_constraints:nth_paragraph_first_word":
        n = rng.choice([2, 3, 4])
        return {
            "num_paragraphs": n,
            "nth_paragraph": rng.randint(2, n),
            "first_word": rng.choice(FIRST_WORDS),
        }
    if kind == "keywords:existence":
        pool = [w for w in KEYWORDS[topic] if w not in task_words and w not in taken]
        words = rng.sample(pool, rng.choice([1, 1, 2]))
        taken.update(words)
        return {"keywords": words}
    if kind == "keywords:forbidden_words":
        pool = FORBIDDEN[topic] + GENERIC_FORBIDDEN
        words = rng.sample([w for w in pool if w not in taken], rng.choice([1, 2, 2, 3]))
        taken.update(words)
        return {"forbidden_words": words}
    if kind == "keywords:frequency":
        if rng.random() < 0.3:
            # The task's own main word, to be used sparingly: pulls against parroting the task.
            words = [w for w in re.findall(r"[a-z]+", task.lower()) if w not in TASK_VERBS]
            longest = max(words, key=len)
            taken.add(longest)
            return {"keyword": longest, "frequency": 2, "relation": "less than"}
        word = rng.choice([w for w in KEYWORDS[topic] if w not in task_words and w not in taken])
        taken.add(word)
        return {"keyword": word, "frequency": rng.choice([2, 3]), "relation": "at least"}
    if kind == "keywords:letter_frequency":
        if rng.random() < 0.5:
            return {
                "letter": rng.choice(RARE_LETTERS[:3]),
                "let_frequency": 2,
                "let_relation": "less than",
            }
        return {
            "letter": rng.choice(RARE_LETTERS),
            "let_frequency": rng.choice([2, 3]),
            "let_relation": "at least",
        }
    if kind == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.choice([2, 3, 3, 4, 5])}
    if kind == "detectable_format:multiple_sections":
        return {
            "section_spliter": rng.choice(["SECTION", "Section", "PART"]),
            "num_sections": rng.choice([2, 3, 4]),
        }
    if kind == "startend:end_checker":
        phrase = rng.choice(END_PHRASES)
        taken.update(re.findall(r"\w+", phrase.lower()))
        return {"end_phrase": phrase}
    if kind == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(["P.S.", "P.S.", "P.P.S"])}
    if kind == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.choice([1, 2, 3])}
    if kind == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.choice([1, 2, 3])}
    return {}


def draw_item(topic: str, task: str, rng: random.Random, deck: Counter) -> list[Constraint]:
    """1-3 compatible constraints, preferring the kinds used least so far (relative to weight)."""
    size = rng.choices([1, 2, 3], weights=[50, 35, 15])[0]
    kinds: list[str] = []
    if YES_NO.match(task) and deck["detectable_format:constrained_response"] < 11:
        kinds.append("detectable_format:constrained_response")
    while len(kinds) < size:
        options = [
            k
            for k in WEIGHTS
            if k != "detectable_format:constrained_response" and compatible(kinds, k)
        ]
        need = sorted(options, key=lambda k: (deck[k] / WEIGHTS[k], rng.random()))
        kinds.append(need[0] if rng.random() < 0.7 else rng.choice(need[:5]))
    taken: set[str] = set()
    # Forbidden words are drawn last so they avoid every phrase the other kinds require.
    kinds.sort(key=lambda k: k == "keywords:forbidden_words")
    return [Constraint(k, draw_args(k, topic, task, rng, taken)) for k in kinds]


def copy_passes(instruction: str, constraints: list[Constraint]) -> bool:
    return all(check(instruction, c).strict for c in constraints)


def build() -> list[dict]:
    rng = random.Random(SEED)
    deck: Counter = Counter()
    items = []
    for topic, tasks in TASKS.items():
        for task in tasks:
            while True:
                constraints = draw_item(topic, task, rng, deck)
                instruction = instruction_text(task, constraints)
                if not copy_passes(instruction, constraints):
                    break
            deck.update(c.kind for c in constraints)
            items.append(
                {
                    "id": f"vi-{len(items):03d}",
                    "topic": topic,
                    "split": "heldout" if topic in HELDOUT_TOPICS else "train",
                    "task": task,
                    "constraints": [c.to_json() for c in constraints],
                    "instruction": instruction,
                }
            )
    return items


def main() -> None:
    items = build()
    OUT.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    counts = Counter(c["kind"] for i in items for c in i["constraints"])
    print(f"{len(items)} items, {sum(i['split'] == 'heldout' for i in items)} held out")
    for kind, n in sorted(counts.items()):
        print(f"| `{kind}` | {n} |")


if __name__ == "__main__":
    main()
