"""Write src/prefloop/data/verifiable_instructions.jsonl: hand-written tasks + drawn constraints.

Deterministic (fixed seed). Run: PYTHONPATH=src python scripts/make_verifiable_instructions.py
(an optional argument writes to another path; tests/test_verifiable_data.py compares the bytes).
Each item gets 1-3 compatible constraints, drawn so that every kind is used often, length kinds
pull both ways, and the instruction copied as an answer never satisfies all its constraints.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from prefloop.constraints import Constraint, check, instruction_text

OUT = Path(__file__).resolve().parents[1] / "src/prefloop/data/verifiable_instructions.jsonl"
SEED = 20240611
HELDOUT_TOPICS = ("gardening", "music", "pets", "home", "school", "weather", "art", "holidays",
                  "languages")

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

# The second block (2026-12-03): 30 more tasks per topic, so that a recipe restricted to a few
# kinds still finds 60+ held-out and 100+ training instructions.
MORE_TASKS: dict[str, list[str]] = {
    "cooking": [
        "How do you keep a cake from sinking in the middle?",
        "Explain why searing meat adds so much flavor.",
        "Describe how to make a simple vegetable stir-fry on a weeknight.",
        "What is the easiest way to peel garlic quickly?",
        "Suggest a hearty breakfast that can be prepared the night before.",
        "Why do people add salt to the water when boiling pasta?",
        "Give tips for holding a chef's knife safely while chopping.",
        "Is it worth buying a pressure cooker for a small kitchen?",
        "Should eggs be kept in the fridge or on the counter?",
        "Can frozen vegetables be as nutritious as fresh ones?",
        "Describe how to make a basic pan sauce after frying chicken.",
        "Explain what it means to fold ingredients together in a recipe.",
        "Recommend a cozy one-pot meal for a cold evening.",
        "How can I tell if cooking oil is hot enough for frying?",
        "What herbs and spices pair well with roasted carrots?",
        "Describe how to make pancakes light and fluffy.",
        "Explain why some recipes ask you to rest meat after cooking.",
        "Suggest ways to cook lentils so they do not turn mushy.",
        "How should a beginner stock a basic pantry?",
        "Give advice for cooking a meal for guests who are vegan.",
        "What is the difference between broiling and baking?",
        "Describe how to make a simple homemade chicken stock.",
        "Explain how marinating changes the texture of tofu or meat.",
        "Why do cookies sometimes spread too much in the oven?",
        "Describe how to caramelize onions without burning them.",
        "Recommend a dessert that needs no oven at all.",
        "How do you sharpen a kitchen knife at home?",
        "Tell me how to make crispy roasted potatoes.",
        "What is a good way to plan meals for a busy week?",
        "Explain how to melt chocolate without it turning grainy.",
    ],
    "travel": [
        "How can I find cheap flights without spending hours searching?",
        "Describe what to keep in a personal bag during a long-haul flight.",
        "Explain how to get through airport security faster.",
        "What should I do if the airline loses my luggage?",
        "Suggest ways to meet locals and learn about their culture while traveling.",
        "Is it better to book accommodation in advance or on arrival?",
        "Should I rent a car or use public transport on a city break?",
        "Are overnight trains a good alternative to flying between nearby cities?",
        "Give tips for taking better photos while traveling.",
        "Describe how to respect local customs when visiting a temple.",
        "Explain how to avoid getting sick from street food while traveling.",
        "What are good ways to spend a long layover at an airport?",
        "Recommend things to do on a weekend trip to the mountains.",
        "How do you choose a trustworthy tour guide?",
        "Describe how to plan a budget-friendly trip to a national park.",
        "Explain how to read a subway map in a foreign city.",
        "Suggest how to make a long bus journey more comfortable.",
        "Why do airlines overbook flights, and what happens when they do?",
        "Give advice for a first solo trip abroad.",
        "How can I avoid common tourist scams?",
        "Describe what a cruise holiday is usually like for first-timers.",
        "What should I know before booking a vacation rental?",
        "Explain how time zones affect planning an international trip.",
        "How do I pick a good neighborhood to stay in a big city?",
        "Describe how to stay connected to the internet while abroad.",
        "Give tips for enjoying a beach vacation without getting bored.",
        "Suggest how a business traveler can arrive less tired.",
        "How can I keep a travel journal I will enjoy rereading?",
        "Explain why travelers are advised to make copies of important documents.",
        "Describe how to handle feeling homesick on a long trip.",
    ],
    "science": [
        "How does a microwave oven heat food?",
        "Explain why the ocean is salty.",
        "Describe what happens inside a volcano when it erupts.",
        "What causes the tides to rise and fall?",
        "Why do stars twinkle at night?",
        "Is a virus considered a living thing?",
        "Do heavier objects fall faster than lighter ones?",
        "Are diamonds and pencil graphite really made of the same element?",
        "Explain how DNA carries instructions for living things.",
        "Describe the water cycle from ocean to rain.",
        "How do batteries store and release energy?",
        "What is gravity and why does it keep us on the ground?",
        "Explain why metal feels colder than wood at the same temperature.",
        "Describe how the human eye sees color.",
        "Why do we see lightning before we hear thunder?",
        "How does a refrigerator keep food cold?",
        "What is the difference between a chemical and a physical change?",
        "Explain what makes a comet have a glowing tail.",
        "Describe how a telescope makes distant objects look closer.",
        "Why does bread turn brown when it is toasted?",
        "How do scientists figure out the age of rocks?",
        "What is an ecosystem and how do its parts depend on each other?",
        "Explain how airplanes stay up in the air.",
        "Describe what happens inside the sun to make light and heat.",
        "Why does a spoon look bent in a glass of water?",
        "How does evolution by natural selection work?",
        "What makes some substances acids and others bases?",
        "Explain how a thermometer measures temperature.",
        "Describe how bacteria can be both helpful and harmful.",
        "Suggest a simple experiment to show how air pressure works.",
    ],
    "history": [
        "Why did people in ancient Rome go to public baths?",
        "Describe how the Great Wall of China was built.",
        "Explain how the Black Death affected life in medieval Europe.",
        "What was it like to travel on a wagon train to the American West?",
        "How did the ancient Greeks hold theater performances?",
        "Is it true that people in the Middle Ages thought the Earth was flat?",
        "Do historians know how Stonehenge was built?",
        "Are the Seven Wonders of the Ancient World still standing today?",
        "Explain why the Industrial Revolution began in Britain.",
        "Describe the role of scribes in ancient Egypt.",
        "How did the Aztecs build a city on a lake?",
        "What did children play with in ancient times?",
        "Explain how canals changed the way goods were transported in the 1800s.",
        "Describe how the first airplanes were developed.",
        "Why was the invention of the wheel so important?",
        "How did medieval knights train for battle?",
        "What was the purpose of medieval guilds?",
        "Explain how the postal service developed over time.",
        "Describe daily life in a Roman household.",
        "Why did the Titanic sink on its first voyage?",
        "How did the invention of the light bulb change daily routines?",
        "What were the main causes of the fall of the Roman Empire?",
        "Explain what the Renaissance was and why it mattered.",
        "Describe how samurai lived in feudal Japan.",
        "Why did ancient civilizations build observatories to watch the stars?",
        "How did people wash clothes before washing machines?",
        "What was the Gold Rush, and why did people join it?",
        "Explain how the ancient Maya developed their calendar.",
        "Describe how early photographs were taken in the 1800s.",
        "Tell me how coffeehouses became popular meeting places in old Europe.",
    ],
    "work": [
        "How can I stop procrastinating on a big work project?",
        "Describe how to build a good relationship with a new manager.",
        "Explain what a professional out-of-office message says.",
        "What should I do if I make a mistake at work?",
        "Suggest ways to network at a professional conference.",
        "Is it okay to leave a job after only a few months?",
        "Should I accept a job offer with higher pay but longer hours?",
        "Can working in a coworking space improve productivity?",
        "Give tips for working well with colleagues in other time zones.",
        "Explain how to delegate tasks to team members effectively.",
        "Describe how to write a cover letter that stands out.",
        "How do you handle a coworker who takes credit for your work?",
        "What are good questions to ask at the end of an interview?",
        "Explain how to set realistic goals for a new quarter.",
        "Describe how to resign from a job politely.",
        "How can a remote worker feel less isolated?",
        "What makes a workplace culture healthy?",
        "Suggest productive uses of a long daily commute.",
        "Give advice for starting a first part-time job as a teenager.",
        "Explain what a good handover before going on leave includes.",
        "Describe how to run a successful team brainstorming session.",
        "How should I respond to a rude email from a client?",
        "How can an employee pick up a new skill for their job?",
        "Give tips for staying calm when a deadline is close.",
        "Explain how to ask for help on a task without seeming unprepared.",
        "Describe how to keep a professional tone in workplace chat messages.",
        "How can a small team celebrate a project launch?",
        "What should a freelancer consider when setting rates for clients?",
        "Suggest how to organize a tidy and efficient desk.",
        "Why do some people work better in the early morning?",
    ],
    "health": [
        "Describe the benefits of eating more fiber.",
        "How can someone stay healthy while traveling for work?",
        "Explain why strength training is useful for older adults.",
        "What are some easy ways to add more vegetables to meals?",
        "Suggest relaxing hobbies that help people unwind in the evening.",
        "Is it healthy to take a nap in the afternoon?",
        "Are fruit juices as healthy as eating whole fruit?",
        "Does cold weather actually make people catch colds?",
        "Give tips for keeping teeth and gums healthy.",
        "Explain how regular exercise can improve mood.",
        "Describe how to prepare healthy lunches for the workweek.",
        "Why is it important to wear a helmet when cycling?",
        "How does too much screen time affect sleep?",
        "What are the benefits of practicing mindfulness each day?",
        "Explain why hearing protection matters at loud concerts.",
        "Give advice for staying healthy while working night shifts.",
        "Describe how to lift heavy boxes without hurting your back.",
        "Suggest ways to reduce salt in everyday cooking.",
        "How can a person improve their balance as they get older?",
        "Why does laughter seem to make people feel better?",
        "What are healthy ways to cope with feeling lonely?",
        "Explain how caffeine affects the body.",
        "Describe a simple morning routine that boosts energy.",
        "How do you stay motivated to eat healthily?",
        "Give tips for preventing blisters on long walks.",
        "Explain why regular checkups with a doctor are worthwhile.",
        "Suggest fun ways for a family to be active together.",
        "What happens to the body during deep sleep?",
        "Describe how to set up a home workout space.",
        "How can a person protect their voice if they talk all day?",
    ],
    "sports": [
        "Explain the offside rule in soccer.",
        "How can a beginner learn to play golf?",
        "Describe how to improve your free throw in basketball.",
        "What are the positions on a baseball team and what do they do?",
        "Why do competitive swimmers wear tight caps and suits?",
        "Is it better to run on a treadmill or outdoors?",
        "Can playing chess be considered a sport?",
        "Should kids specialize in one sport at a young age?",
        "Give tips for training for a first five kilometer race.",
        "Describe the basic rules of cricket.",
        "Explain how a tiebreak works in tennis.",
        "What makes a good coach for young players?",
        "How do teams decide on tactics before a big match?",
        "Suggest fun drills for improving soccer passing.",
        "Which bicycle frame size fits a rider, and how do you check?",
        "Why is teamwork so important in rowing?",
        "Explain how points are scored in rugby.",
        "How can a player handle nerves before a competition?",
        "What equipment does a beginner need for table tennis?",
        "Give advice for joining a local running club.",
        "Describe how to do a proper push-up.",
        "Explain why home teams often seem to have an advantage.",
        "How do figure skaters spin so fast without getting dizzy?",
        "What does a caddie do for a golfer?",
        "Suggest ways to stay fit during the off-season.",
        "Describe how a penalty shootout works in soccer.",
        "Why do cyclists ride close behind each other in races?",
        "Give tips for watching a live game with young children.",
        "Explain how to keep score in bowling.",
        "How should a beginner pick a martial art to learn?",
    ],
    "money": [
        "How can a couple talk openly about money without arguing?",
        "Explain what an index fund is in simple terms.",
        "Describe how to build a savings habit on a low income.",
        "What are the pros and cons of paying with cash?",
        "Suggest ways to cut down on monthly subscription costs.",
        "Is it a good idea to lend money to friends?",
        "Should I pay for things with a credit card to earn rewards?",
        "Are extended warranties usually worth buying?",
        "Give tips for buying a used car without overpaying.",
        "Explain how a mortgage works for a first-time buyer.",
        "Describe how to plan a wedding on a modest budget.",
        "Why do people say you should pay yourself first?",
        "How can a freelancer handle an irregular income?",
        "What is the point of starting to save for retirement early?",
        "Explain what diversification means for investing.",
        "Describe how to save money when buying gifts for the holidays.",
        "Suggest cheap but fun weekend activities for a family.",
        "How do coupons and cashback apps actually save money?",
        "What should I do if I find an error on a bill?",
        "Give advice for handling money after getting a first paycheck.",
        "Explain the difference between needs and wants when budgeting.",
        "Describe how to set financial goals for the coming year.",
        "Why do some people prefer to buy secondhand items?",
        "How can someone negotiate a lower price on a large purchase?",
        "What are good ways to save money on eating out?",
        "Explain how a sinking fund works for planned expenses.",
        "Suggest ways to reduce costs when moving to a new apartment.",
        "Give tips for avoiding late fees on bills.",
        "Describe what a pension is and how it works.",
        "How should a family prepare financially for a new baby?",
    ],
    "technology": [
        "Explain how a computer mouse detects movement on a desk.",
        "What does a router do in a home network?",
        "Describe how to free up storage space on a full phone.",
        "Why do phone batteries seem to wear out after a few years?",
        "Give advice on cleaning crumbs and dust out of a laptop keyboard.",
        "How does a touchscreen know where a finger is pressing?",
        "Is it worth buying an extended warranty for a new tablet?",
        "Explain what a VPN is and when someone might use one.",
        "Describe how email gets from one person to another.",
        "Suggest fixes for a home Wi-Fi signal that does not reach far rooms.",
        "What is the difference between RAM and storage on a computer?",
        "How can a parent set up a tablet safely for a young child?",
        "Explain how a smart speaker understands spoken commands.",
        "Describe what happens when you restart a frozen computer.",
        "Should people cover their laptop webcam when not using it?",
        "Give advice for organizing thousands of digital photos.",
        "Why do websites ask permission to use cookies?",
        "Explain how wireless phone charging works.",
        "Describe how to recognize a fake online shopping website.",
        "What should someone check before buying a used laptop?",
        "How does a 3D printer build an object layer by layer?",
        "Suggest how beachgoers can keep a phone safe from water damage.",
        "Explain what an operating system is in everyday terms.",
        "Can old electronics be recycled instead of thrown away?",
        "Describe how to set up a new printer at home.",
        "Why does a phone get warm while it is charging?",
        "Give tips for writing a clear message to tech support.",
        "How do streaming services deliver movies without long downloads?",
        "Explain how Bluetooth connects wireless headphones to a phone.",
        "What does it mean when an app asks for location access?",
    ],
    "nature": [
        "Why do fireflies glow on summer nights?",
        "Explain how beavers build dams across streams.",
        "Describe what lives on the floor of a rainforest.",
        "How do octopuses change color to hide from predators?",
        "What makes some mushrooms grow in circles on the ground?",
        "Are sharks as dangerous to swimmers as films suggest?",
        "Explain how caves form in limestone rock.",
        "Describe how salmon return to the river where they hatched.",
        "Why do geese fly in a V shape?",
        "How does moss grow on rocks without any soil?",
        "Give tips for finding animal tracks in mud or snow.",
        "Explain how glaciers carve valleys as they move.",
        "What do animals in the deep ocean eat?",
        "Describe how a volcanic island forms in the ocean.",
        "Do all spiders spin webs to catch their food?",
        "Suggest ways to enjoy a nature walk without disturbing animals.",
        "How do owls hunt so well in the dark?",
        "Explain why some frogs are so brightly colored.",
        "Describe the role of fungi in breaking down fallen logs.",
        "Why do whales sing to each other?",
        "What causes sand dunes to move across a desert?",
        "How can a family help keep a local beach clean?",
        "Explain how ants work together in a colony.",
        "Describe how a pond changes from spring to winter.",
        "Can a starfish really regrow a lost arm?",
        "Give advice for watching birds without scaring them away.",
        "Why do some animals travel together in large herds?",
        "Explain what a food chain in a meadow looks like.",
        "Describe how a tadpole turns into a frog.",
        "What is the tallest kind of tree and where does it grow?",
    ],
    "gardening": [
        "How deep should carrot seeds be planted?",
        "Explain how to test whether garden soil is acidic or alkaline.",
        "What are good companion plants to grow next to tomatoes?",
        "Give tips for growing potatoes in a large bag.",
        "Suggest shade-loving plants for a dark corner of the yard.",
        "Why do cucumber plants sometimes drop their flowers?",
        "Describe how to take a cutting from a geranium.",
        "Is it necessary to remove dead flowers from petunias?",
        "How can weeds be controlled without using chemicals?",
        "Explain how to plant a young fruit tree.",
        "What causes yellow leaves on a pepper plant?",
        "Describe building a simple trellis that climbing beans can grow up.",
        "Can used coffee grounds be added to garden soil?",
        "Give advice for keeping birds from eating newly sown seeds.",
        "Explain why crop rotation helps a vegetable garden.",
        "How do you divide an overgrown clump of hostas?",
        "Suggest ways to attract bees to a small vegetable patch.",
        "What should a gardener grow in a spot that stays wet?",
        "Describe how to harvest lettuce so it keeps growing.",
        "Why does basil start flowering and how can it be stopped?",
        "Explain how to care for a pot of lavender.",
        "Should tomato plants have their side shoots pinched off?",
        "How can a gardener tell when squash is ready to pick?",
        "Give tips for starting seeds indoors under a grow lamp.",
        "Describe how to grow a pumpkin for autumn.",
        "Why do gardeners harden off seedlings before planting them out?",
        "Explain how to grow garlic from a single clove.",
        "Suggest low-maintenance plants for someone who travels often.",
        "How do you keep aphids off rose bushes?",
        "Describe planning a small wildflower meadow in a backyard.",
    ],
    "music": [
        "Explain what a key signature tells a musician.",
        "How does a microphone turn a voice into a signal?",
        "Describe the difference between a violin and a viola.",
        "Give tips for tuning a guitar by ear.",
        "What makes jazz different from other kinds of music?",
        "Is it better to learn an instrument from a teacher or online videos?",
        "Why do pianos have both black and white keys?",
        "Suggest how parents can keep a child motivated during music lessons.",
        "How can a singer warm up their voice before practice?",
        "Describe what a metronome does and why musicians use one.",
        "Explain how a choir blends many voices together.",
        "What should someone know before buying a used keyboard?",
        "Give advice for forming a band with friends.",
        "Describe how a harmonica produces different notes.",
        "Can playing an instrument help improve memory?",
        "Explain what a time signature like three four means.",
        "How do DJs blend one song smoothly into the next?",
        "Suggest instruments that are easy for young children to start with.",
        "What is an encore and why do audiences ask for one?",
        "Describe how folk songs are usually passed down through generations.",
        "Why do brass players buzz their lips into the mouthpiece?",
        "Explain how an electric guitar differs from an acoustic one.",
        "Give tips for learning a song just by listening to it.",
        "How can someone practice drums without bothering the neighbors?",
        "Describe how a film soundtrack adds to the mood of a scene.",
        "Should beginners learn music theory before playing songs?",
        "What does it mean to sing a cappella?",
        "Suggest ways to build a music playlist for a dinner party.",
        "Explain why orchestras tune to the oboe before a concert.",
        "Describe what a beginner ukulele player should learn first.",
    ],
    "pets": [
        "How can you tell if a cat is feeling stressed?",
        "Describe a comfortable cage setup for a guinea pig.",
        "Explain why dogs sniff everything on a walk.",
        "Give tips for brushing a long-haired dog.",
        "Tell a first-time owner what keeping a turtle involves.",
        "Is it safe for cats to drink cow's milk?",
        "Suggest ways to stop a puppy from chewing shoes.",
        "Why do dogs wag their tails?",
        "Describe how to bathe a dog that hates water.",
        "How do you teach a cat to use a scratching post?",
        "Explain how to tell whether a dog collar fits properly.",
        "What do pet rabbits need to eat each day?",
        "Can two male guinea pigs live together happily?",
        "Give advice for leaving a dog home alone for a workday.",
        "Describe how to help an adopted shelter dog settle in.",
        "How can you keep a dog calm at the vet?",
        "Explain why cats sometimes bring dead mice to their owners.",
        "Suggest enrichment ideas for a pet rat.",
        "Why might adopting an older dog be a wise choice?",
        "Describe how to walk a dog that pulls on the leash.",
        "Does a pet fish need a light in its tank?",
        "Why do some dogs bark at every passing stranger?",
        "How should a pet lizard's tank be kept warm?",
        "How can an owner look after a dog's teeth?",
        "Explain how to socialize a shy puppy with other dogs.",
        "What should pet owners pack when boarding a dog at a kennel?",
        "Describe a good daily routine for a pet hamster.",
        "Suggest ways to help a cat and a small child get along.",
        "How much exercise does a young border collie need?",
        "Explain why some cats love sitting in cardboard boxes.",
    ],
    "home": [
        "How do you stop a toilet from running constantly?",
        "How can I sort out a messy kitchen drawer?",
        "Explain how to bleed a radiator at home.",
        "Give tips on organizing the shelves of a refrigerator.",
        "How can grout between bathroom tiles be cleaned?",
        "Is it worth installing a programmable thermostat?",
        "Suggest how to give a rented apartment a personal touch.",
        "Why does a shower drain start to smell bad?",
        "Describe how to remove limescale from a kettle.",
        "How can a family reduce noise between rooms?",
        "Explain how to pick a rug size for a living room.",
        "What should be kept in a basic household emergency kit?",
        "Can a dishwasher clean things other than dishes?",
        "Give advice for decluttering clothes that no longer fit.",
        "Describe how to reset a tripped circuit breaker.",
        "How do you get rid of fruit flies in a kitchen?",
        "Explain how to seal drafts around an old window.",
        "Suggest ways to add more storage to a small bathroom.",
        "What causes condensation on bedroom walls in winter?",
        "Describe how to clean an oven without harsh chemicals.",
        "Should bed sheets be washed every week?",
        "How can someone make a dark hallway feel brighter?",
        "Give tips for setting up a cozy reading corner.",
        "Explain how to tighten a wobbly chair leg.",
        "How should boxes be labeled when moving house?",
        "Describe how to care for hardwood floors.",
        "Why do light bulbs in a house sometimes flicker?",
        "Suggest ways to keep shoes from piling up by the door.",
        "How should a mattress be cleaned and freshened?",
        "Explain how to replace a worn-out cabinet handle.",
    ],
    "school": [
        "How can a student stay focused during a long lecture?",
        "Describe how to pack a school backpack the night before.",
        "Explain how to approach a tricky story problem in math class.",
        "Give tips for memorizing a poem for class.",
        "What should a student bring on a class field trip?",
        "Is it helpful to rewrite class notes after school?",
        "Suggest ways to make friends in a new class.",
        "Why do math teachers ask students to show their work?",
        "Describe what a strong book report contains.",
        "How do you prepare for a spelling test?",
        "Explain the difference between a summary and an analysis.",
        "What makes a good science lab report?",
        "Can students learn well by teaching material to a classmate?",
        "Give advice for choosing an elective class.",
        "Describe how to use a library catalog to find a book.",
        "How can a student manage nerves before a school play?",
        "Explain how to cite a website in a school report.",
        "Suggest ways for a student to balance sports and schoolwork.",
        "How can a student get ready for an oral exam?",
        "Describe what a student council does at a school.",
        "Should students use a paper planner or a phone app for homework?",
        "How can a student improve their handwriting?",
        "Give tips for staying awake and alert in morning classes.",
        "Explain reading a timeline in a history textbook.",
        "What should a student do after missing a week of school?",
        "Describe what makes a class project poster eye-catching.",
        "Why is recess important for younger children?",
        "Suggest quiet activities for students who finish a test early.",
        "How should a student prepare for a parent-teacher conference?",
        "Explain how to learn the times tables quickly.",
    ],
    "weather": [
        "How do meteorologists measure wind speed?",
        "Describe what causes drizzle instead of heavy rain.",
        "Explain why snowflakes have six sides.",
        "Give tips for reading a weather forecast map.",
        "How does sleet differ from freezing rain?",
        "Is it safe to be outside during a lightning storm?",
        "Suggest activities for a family stuck indoors on a snowy day.",
        "Why does it often feel colder on a windy day?",
        "Describe how a blizzard differs from an ordinary snowstorm.",
        "How do weather balloons collect information about the sky?",
        "Explain what the dew point means.",
        "What causes a drought to develop over many months?",
        "Can it rain when the sun is shining?",
        "Give advice for keeping warm at an outdoor event in winter.",
        "Describe how dust storms form in dry regions.",
        "How can someone measure rainfall with a homemade gauge?",
        "Explain why mountains often get more rain on one side.",
        "What does a chance of rain percentage actually mean?",
        "Describe what the eye of a hurricane is like.",
        "Why do some summer days end with sudden afternoon showers?",
        "Does it really get colder right before sunrise?",
        "How do sea breezes form near the coast?",
        "Explain how frost forms on car windows overnight.",
        "Suggest ways to stay informed when severe weather is coming.",
        "What is a polar vortex and how does it affect winter?",
        "Describe how thunder and lightning are related.",
        "Why is the weather harder to predict a week ahead?",
        "Give tips for protecting windows before a big storm.",
        "How does El Nino affect weather around the world?",
        "Explain why snow sometimes squeaks underfoot on very cold days.",
    ],
}

# The third block (2026-12-07): new topics, only the default recipe's 8 kinds, so that each of
# them has 100+ training instructions (issue #23). Tasks are a template applied to a subject.
FOCUS_KINDS = (
    "detectable_content:postscript",
    "startend:end_checker",
    "punctuation:no_comma",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "length_constraints:number_words",
    "length_constraints:number_sentences",
)
# Relative weights: roughly each kind's shortfall from 100 training instructions after the
# first two blocks (keywords:frequency had 39, length_constraints:number_words 75).
FOCUS_WEIGHTS = {
    "keywords:frequency": 75,
    "length_constraints:number_sentences": 65,
    "keywords:existence": 60,
    "startend:end_checker": 60,
    "punctuation:no_comma": 55,
    "keywords:forbidden_words": 55,
    "detectable_content:postscript": 55,
    "length_constraints:number_words": 40,
}
# Held-out templates share no run of 5 words with the training ones (nor with any other task).
TRAIN_TEMPLATES = (
    "Give a beginner some practical tips about {s}.",
    "What do people often get wrong about {s}?",
    "Explain what {s} can teach us about everyday life.",
    "Describe how a newcomer can learn about {s}.",
    "Write a note that helps a friend understand {s}.",
)
HELDOUT_TEMPLATES = (
    "Share useful advice for anyone curious about {s}.",
    "Which misunderstandings about {s} are the most widespread?",
    "Tell me what makes {s} worth the effort.",
    "How would you introduce {s} to a complete stranger?",
    "Summarize the basics of {s} for a young reader.",
)
FOCUS_SUBJECTS: dict[str, list[str]] = {
    "crafts": ["knitting a scarf", "pottery on a wheel", "sewing by hand", "paper folding",
               "woodcarving", "making candles", "scrapbooking", "embroidery"],
    "cars": ["changing a flat tire", "checking engine oil", "electric cars", "driving in fog",
             "buying a used car", "parallel parking", "car insurance", "long highway drives"],
    "reading": ["reading before bed", "joining a book club", "audiobooks", "reading poetry",
                "keeping a reading journal", "borrowing from a library", "speed reading",
                "classic novels"],
    "shopping": ["comparing prices online", "buying second-hand clothes", "shopping with a list",
                 "store loyalty cards", "returning a faulty product", "buying in bulk",
                 "farmers markets", "impulse purchases"],
    "family": ["planning a family dinner", "sharing chores with siblings", "visiting grandparents",
               "family game nights", "keeping in touch with cousins", "raising twins",
               "living with relatives", "family traditions"],
    "ocean": ["coral reefs", "ocean tides", "sea turtles", "deep sea exploration",
              "plastic in the ocean", "whale migration", "tide pools", "ocean currents"],
    "space": ["the International Space Station", "the planet Mars", "meteor showers",
              "space telescopes", "the life of a star", "astronaut training",
              "the rings of Saturn", "solar eclipses"],
    "games": ["playing chess", "board games for families", "retro video games", "card tricks",
              "crossword puzzles", "building with toy blocks", "trivia nights",
              "strategy games"],
    "art": ["watercolor painting", "sketching portraits", "visiting art museums", "painting street murals",
            "collage making", "photography in low light", "sculpting with clay", "studying color theory"],
    "holidays": ["decorating for a festival", "gift wrapping", "holiday baking with kids",
                 "sending greeting cards", "making new year resolutions", "hosting a holiday party",
                 "traveling during the holidays", "spending quiet holidays at home"],
    "languages": ["learning a second language", "learning sign language", "practicing pronunciation",
                  "finding a language exchange partner", "memorizing vocabulary", "fixing grammar mistakes",
                  "raising bilingual children", "reading in a foreign language"],
}
FOCUS_HELDOUT = ("art", "holidays", "languages")


def focus_tasks() -> dict[str, list[str]]:
    """The third block's tasks: every subject in every template of its split."""
    return {
        topic: [
            t.format(s=s)
            for t in (HELDOUT_TEMPLATES if topic in FOCUS_HELDOUT else TRAIN_TEMPLATES)
            for s in subjects
        ]
        for topic, subjects in FOCUS_SUBJECTS.items()
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
    "crafts": ["patience", "hands", "materials", "practice", "pattern", "gift", "careful"],
    "cars": ["safety", "road", "check", "careful", "mechanic", "distance", "cost"],
    "reading": ["story", "pages", "habit", "author", "quiet", "imagination", "pace"],
    "shopping": ["price", "list", "quality", "store", "budget", "compare", "receipt"],
    "family": ["together", "kindness", "respect", "share", "weekend", "listen", "memories"],
    "ocean": ["waves", "species", "coast", "salt", "depth", "protect", "blue"],
    "space": ["orbit", "planet", "gravity", "distance", "light", "telescope", "mission"],
    "games": ["strategy", "rules", "fun", "players", "practice", "win", "turn"],
    "art": ["color", "practice", "light", "shape", "patience", "style", "brush"],
    "holidays": ["together", "tradition", "plan", "gift", "budget", "calm", "joy"],
    "languages": ["practice", "words", "patience", "listen", "culture", "daily", "mistakes"],
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
    "crafts": ["craft", "make", "hobby", "simple", "create"],
    "cars": ["car", "drive", "driver", "vehicle", "engine"],
    "reading": ["book", "books", "read", "reading", "time"],
    "shopping": ["buy", "money", "shop", "store", "price"],
    "family": ["family", "parents", "children", "time", "home"],
    "ocean": ["ocean", "sea", "water", "fish", "marine"],
    "space": ["space", "earth", "stars", "planets", "sun"],
    "games": ["game", "games", "play", "player", "board"],
    "art": ["art", "paint", "artist", "create", "colors"],
    "holidays": ["holiday", "family", "friends", "time", "celebrate"],
    "languages": ["language", "learn", "speak", "words", "native"],
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
# Template words are not the task's main word (keywords:frequency "less than" takes it from the
# subject instead).
FOCUS_SKIP = TASK_VERBS | {
    w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for w in re.findall(r"[a-z]+", t.lower())
}

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


def draw_args(
    kind: str, topic: str, task: str, rng: random.Random, taken: set[str], skip: set[str]
) -> dict:
    """Arguments for one kind; ``taken`` holds words already used so none are both required
    and forbidden; ``skip``: words that are never the task's main word."""
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
            words = [w for w in re.findall(r"[a-z]+", task.lower()) if w not in skip]
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


def draw_item(
    topic: str,
    task: str,
    rng: random.Random,
    deck: Counter,
    weights: dict[str, int] = WEIGHTS,
    skip: set[str] = TASK_VERBS,
) -> list[Constraint]:
    """1-3 compatible constraints of ``weights``' kinds, preferring the kinds used least so far
    (relative to weight)."""
    size = rng.choices([1, 2, 3], weights=[50, 35, 15])[0]
    kinds: list[str] = []
    yes_no = "detectable_format:constrained_response"
    if yes_no in weights and YES_NO.match(task) and deck[yes_no] < 11:
        kinds.append(yes_no)
    while len(kinds) < size:
        options = [k for k in weights if k != yes_no and compatible(kinds, k)]
        need = sorted(options, key=lambda k: (deck[k] / weights[k], rng.random()))
        kinds.append(need[0] if rng.random() < 0.7 else rng.choice(need[:5]))
    taken: set[str] = set()
    # Forbidden words are drawn last so they avoid every phrase the other kinds require.
    kinds.sort(key=lambda k: k == "keywords:forbidden_words")
    return [Constraint(k, draw_args(k, topic, task, rng, taken, skip)) for k in kinds]


def copy_passes(instruction: str, constraints: list[Constraint]) -> bool:
    return all(check(instruction, c).strict for c in constraints)


def build() -> list[dict]:
    """The first block (TASKS), then the second (MORE_TASKS) and the third (focus_tasks), each from
    its own random stream, so earlier blocks' items and ids are the same as before a later one was
    written. The third draws only FOCUS_KINDS, balanced within the block (its own deck)."""
    deck: Counter = Counter()
    items: list[dict] = []
    blocks = (
        (SEED, TASKS, WEIGHTS, deck, TASK_VERBS),
        (SEED + 1, MORE_TASKS, WEIGHTS, deck, TASK_VERBS),
        (SEED + 2, focus_tasks(), FOCUS_WEIGHTS, Counter(), FOCUS_SKIP),
    )
    for seed, block, weights, block_deck, skip in blocks:
        rng = random.Random(seed)
        for topic, tasks in block.items():
            for task in tasks:
                while True:
                    constraints = draw_item(topic, task, rng, block_deck, weights, skip)
                    instruction = instruction_text(task, constraints)
                    if not copy_passes(instruction, constraints):
                        break
                block_deck.update(c.kind for c in constraints)
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


def main(out: Path = OUT) -> None:
    items = build()
    out.write_text(
        "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8"
    )
    counts = Counter(c["kind"] for i in items for c in i["constraints"])
    print(f"{len(items)} items, {sum(i['split'] == 'heldout' for i in items)} held out")
    for kind, n in sorted(counts.items()):
        print(f"| `{kind}` | {n} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
