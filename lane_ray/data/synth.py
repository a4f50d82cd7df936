"""Synthetic catalogue and interaction generator, streamed to Parquet in bounded memory.

Items get multi-word titles built from genre-flavoured vocabularies, one primary genre and a release year.
Item ``i`` (1-based) belongs to genre ``(i - 1) % G`` at within-genre slot ``(i - 1) // G``; a fixed
permutation of slots gives each genre a Zipf popularity order, so sampling needs no per-item arrays and
memory stays flat in the number of items. Each user has a primary and a secondary genre; an interaction
comes from them with probability ``genre_coherence`` (primary 70 %), otherwise from any genre.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lane_ray.atomic import atomic_path
from lane_ray.config import SynthConfig
from lane_ray.io import write_json

GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_GENRE_WORDS = {
    "Action": "Strike Fury Vengeance Bullet Impact Chase Showdown Fire Protocol Assault Mission Target",
    "Adventure": "Quest Voyage Treasure Expedition Island Journey Frontier Map Jungle Odyssey Legend Compass",
    "Animation": "Bunny Dragonling Robot Penguin Balloon Toybox Kitten Rainbow Cloud Bubble Pixie Teapot",
    "Children's": "Puppy Treehouse Birthday Wizard Pony Sandcastle Snowman Lullaby Playground Kite Fairy Cub",
    "Comedy": "Wedding Roommate Vacation Blunder Dinner Neighbor Holiday Prank Makeover Mixup Weekend Roast",
    "Crime": "Heist Syndicate Alibi Ransom Witness Informant Racket Cartel Getaway Verdict Precinct Con",
    "Documentary": "Earth Ocean Century Voices Archive Revolution Harvest Machine Empire Climate River Atlas",
    "Drama": "Letters Promise Inheritance Silence Season Homecoming Orchard Widow Harbor Portrait Bridge Vow",
    "Fantasy": "Sorcerer Crown Dragon Realm Amulet Prophecy Elf Kingdom Spellbook Oracle Griffin Throne",
    "Film-Noir": "Shadows Dame Rain Nightfall Smoke Detective Alley Neon Double Cross Stranger Murmur",
    "Horror": "Haunting Crypt Possession Curse Asylum Bloodline Mask Cellar Ritual Nightmare Hollow Coven",
    "Musical": "Melody Ballroom Broadway Chorus Serenade Rhythm Jukebox Encore Harmony Tango Overture Song",
    "Mystery": "Clue Riddle Cipher Manor Disappearance Locket Secret Enigma Puzzle Keyhole Inquest Trail",
    "Romance": "Love Kiss Heart Summer Sweetheart Proposal Valentine Moonlight Darling Romance Embrace Rose",
    "Sci-Fi": "Galaxy Android Orbit Colony Starship Quantum Nebula Clone Cyborg Wormhole Mars Signal",
    "Thriller": "Conspiracy Pursuit Hostage Deadline Code Trap Sniper Escape Cover Blackout Agent Dossier",
    "War": "Battalion Trenches Front Armistice Sergeant Battle Beachhead Regiment Convoy Siege Medal Flag",
    "Western": "Outlaw Sheriff Gunslinger Canyon Saloon Stagecoach Ranch Bounty Mesa Rider Posse Rustler",
}
_ADJ = ("Last First Dark Silent Golden Broken Hidden Lost Eternal Wild Secret Final Crimson Midnight Frozen "
        "Burning Lonely Brave Savage Distant Forgotten Endless Iron Scarlet Hollow Restless Fallen Sacred "
        "Shattered Bitter Electric Quiet Velvet Wicked Gentle Reckless Northern Little Big Long Blue Black "
        "White Red Green Silver Stolen Second Perfect Impossible Dangerous Strange Curious Lucky Crooked "
        "Bright").split()
_NOUN = ("Night Road River City Dream Game Heart Sky House Storm Shadow Garden Light Song Sea Mountain Fire "
         "Road Moon Star Town Summer Winter Truth Promise Kingdom Empire Island Forest Mirror Door Letter Voice "
         "Machine Station Harbor Tower Hour Journey Secret Child Stranger Brother Sister Father Mother King "
         "Queen Soldier Doctor Hunter Angel Devil Ghost Legend Witness Lady Gentleman Pilot").split()
_PLACE = ("Paris Tokyo Brooklyn Texas Rome Vegas Alaska Berlin Cairo Havana Dublin Chicago Marseille Bombay "
          "Sicily Memphis Montana Kyoto Casablanca Vienna Lisbon Seattle Oslo Nairobi Shanghai Reno Tangier").split()
_NAME = ("Harry Maria Jack Lucy Max Nora Sam Rosa Leo Iris Frank Vera Oscar Ada Hugo Elsa Felix June Otto Mae "
         "Victor Clara Ruby Walter Ines Jonas Greta Mickey Stella Arthur").split()
_SUFFIX = ("", "", "", "", "", "", "", "", " II", " 2", " III", " Returns", ": The Beginning", " Redux",
           ": Part Two", " Forever")
_PATTERNS = (
    "The {a} {g}", "{g} of the {a} {n}", "{p}'s {a} {n}", "{a} {n} in {c}", "The {n} and the {a} {g}",
    "{g}: {a} {n}", "{A} {a} {g}", "{a} {n} of {c}", "Return to the {a} {g}", "{a} {g}, {a2} {n}",
    "The {c} {g}", "Escape from the {a} {n}", "{p} and the {a} {g}", "Beyond the {a} {n}",
)


def _words(genre: str) -> list[str]:
    return _GENRE_WORDS[genre].split()


def item_titles(item_ids: np.ndarray, num_genres: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Titles, genre strings and years for ``item_ids`` (deterministic in id and seed)."""
    rng = np.random.default_rng([seed, int(item_ids[0]) if item_ids.size else 0, 7])
    n = item_ids.size
    genre_idx = (item_ids - 1) % num_genres
    pat = rng.integers(len(_PATTERNS), size=n)
    a, a2 = rng.integers(len(_ADJ), size=n), rng.integers(len(_ADJ), size=n)
    nn, c, p = rng.integers(len(_NOUN), size=n), rng.integers(len(_PLACE), size=n), rng.integers(len(_NAME), size=n)
    g = rng.integers(12, size=n)
    suf = rng.integers(len(_SUFFIX), size=n)
    sub = rng.random(n) < 0.25
    n2 = rng.integers(len(_NOUN), size=n)
    second = rng.integers(num_genres, size=n)
    years = rng.integers(1930, 2024, size=n)
    gw = [_words(GENRES[k]) for k in range(num_genres)]
    titles, genres = [], []
    for k in range(n):
        gi = int(genre_idx[k])
        adj = _ADJ[a[k]]
        t = _PATTERNS[pat[k]].format(
            A="An" if adj[0] in "AEIOU" else "A", a=adj, a2=_ADJ[a2[k]], n=_NOUN[nn[k]], c=_PLACE[c[k]],
            p=_NAME[p[k]], g=gw[gi][g[k] % len(gw[gi])],
        )
        if sub[k]:  # a subtitle keeps large catalogues from repeating titles too often
            t += f": {_ADJ[a2[k]]} {_NOUN[n2[k]]}"
        titles.append(t + _SUFFIX[suf[k]])
        s = int(second[k])
        genres.append(GENRES[gi] if s == gi or s % 3 else f"{GENRES[gi]}|{GENRES[s]}")
    return titles, genres, [str(y) for y in years]


class ZipfGenreSampler:
    """Samples item ids of a genre by Zipf popularity over a fixed per-genre permutation."""

    def __init__(self, num_items: int, num_genres: int, a: float, seed: int) -> None:
        self.N, self.G = num_items, min(num_genres, num_items)
        self.sizes = np.array([len(range(g, num_items, self.G)) for g in range(self.G)], dtype=np.int64)
        max_n = int(self.sizes.max())
        w = np.arange(1, max_n + 1, dtype=np.float64) ** -a
        self.cdf = np.cumsum(w)
        rng = np.random.default_rng([seed, 11])
        # Affine permutation of slots per genre: slot = (rank * mult + shift) mod size, mult coprime to size.
        self.mult = np.empty(self.G, dtype=np.int64)
        self.shift = np.empty(self.G, dtype=np.int64)
        for g, n in enumerate(self.sizes):
            m = int(rng.integers(1, max(n, 2)))
            while math.gcd(m, int(n)) != 1:
                m += 1
            self.mult[g], self.shift[g] = m, int(rng.integers(0, n))

    def sample(self, genres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n_g = self.sizes[genres]
        u = rng.random(genres.size) * self.cdf[n_g - 1]
        rank = np.minimum(np.searchsorted(self.cdf, u, side="right"), n_g - 1)
        slot = (rank * self.mult[genres] + self.shift[genres]) % n_g
        return slot * self.G + genres + 1


def _user_chunk(users: np.ndarray, cfg: SynthConfig, sampler: ZipfGenreSampler) -> pa.Table:
    rng = np.random.default_rng([cfg.seed, int(users[0]), 3])
    G = sampler.G
    n_users = users.size
    lengths = cfg.min_session_len + rng.geometric(1.0 / max(cfg.mean_session_len - cfg.min_session_len + 1, 1.0),
                                                  size=n_users) - 1
    lengths = np.minimum(lengths, max(cfg.min_session_len, sampler.N // 2))
    draw = lengths * 2 + 4  # oversample, then drop repeats and trim
    owner = np.repeat(np.arange(n_users), draw)
    primary, secondary = rng.integers(G, size=n_users), rng.integers(G, size=n_users)
    coherent = rng.random(owner.size) < cfg.genre_coherence
    use_primary = rng.random(owner.size) < 0.7
    genre = np.where(coherent, np.where(use_primary, primary[owner], secondary[owner]),
                     rng.integers(G, size=owner.size))
    items = sampler.sample(genre, rng)
    key = owner.astype(np.int64) * (sampler.N + 1) + items
    _, first = np.unique(key, return_index=True)
    first.sort()
    owner, items = owner[first], items[first]
    # position of each interaction within its user, to trim to the wanted length
    starts = np.searchsorted(owner, np.arange(n_users))
    pos = np.arange(owner.size) - starts[owner]
    keep = pos < lengths[owner]
    owner, items, pos = owner[keep], items[keep], pos[keep]
    t0 = rng.integers(1_420_070_400, 1_577_836_800, size=n_users)  # 2015-01-01 .. 2020-01-01
    gaps = rng.exponential(86_400.0, size=owner.size).astype(np.int64) + 1
    # cumulative gaps within each user
    csum = np.cumsum(gaps)
    base = np.where(pos == 0, csum - gaps, 0)
    base = np.maximum.accumulate(base)
    ts = t0[owner] + (csum - base)
    return pa.table({
        "user_id": pa.array(users[owner], pa.int64()),
        "item_id": pa.array(items, pa.int64()),
        "timestamp": pa.array(ts, pa.int64()),
    })


def percent_logger(step: int = 10) -> Callable[[str, int, int], None]:
    """A ``progress`` callback for :func:`generate` that logs each kind of row every ``step`` percent."""
    from lane_ray.console import log

    last: dict[str, int] = {}

    def progress(kind: str, done: int, total: int) -> None:
        pct = 100 * done // total
        if pct >= last.get(kind, -step) + step or done == total:
            last[kind] = pct
            log(f"synth: {kind} {done:,}/{total:,} ({pct}%)")

    return progress


def generate(cfg: SynthConfig, out_dir: str | Path,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/data/catalog.parquet`` and ``interactions.parquet`` (and ``synth.json``).

    Memory is bounded by one chunk of items or users, whatever ``cfg.items`` and ``cfg.users`` are.
    ``progress(kind, done, total)`` is called after each chunk.
    """
    d = Path(out_dir) / "data"
    d.mkdir(parents=True, exist_ok=True)
    G = min(cfg.genres, cfg.items)
    cat_schema = pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("genres", pa.string()),
                            ("year", pa.string())])
    with atomic_path(d / "catalog.parquet") as tmp, pq.ParquetWriter(tmp, cat_schema) as w:
        for start in range(1, cfg.items + 1, cfg.chunk_items):
            ids = np.arange(start, min(start + cfg.chunk_items, cfg.items + 1), dtype=np.int64)
            titles, genres, years = item_titles(ids, G, cfg.seed)
            w.write_table(pa.table({"item_id": ids, "title": titles, "genres": genres, "year": years},
                                   schema=cat_schema))
            if progress:
                progress("items", int(ids[-1]), cfg.items)
    sampler = ZipfGenreSampler(cfg.items, G, cfg.zipf_a, cfg.seed)
    n_inter = 0
    inter_schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    with atomic_path(d / "interactions.parquet") as tmp, pq.ParquetWriter(tmp, inter_schema) as w:
        for start in range(1, cfg.users + 1, cfg.chunk_users):
            users = np.arange(start, min(start + cfg.chunk_users, cfg.users + 1), dtype=np.int64)
            table = _user_chunk(users, cfg, sampler)
            n_inter += table.num_rows
            w.write_table(table)
            if progress:
                progress("users", int(users[-1]), cfg.users)
    summary = {"items": cfg.items, "users": cfg.users, "interactions": n_inter, "genres": G,
               "config": cfg.model_dump(mode="json")}
    write_json(d / "synth.json", summary)
    return summary
