"""Label sets and the lookup tables that map every dataset's encoding to the 19 Cityscapes train ids.

Every mapping is a 256-entry ``np.uint8`` table applied as ``table[label]`` (one array operation, no
per-pixel Python). Values that a table does not list map to ``IGNORE_INDEX`` (255), which is what the
DGSS literature does for classes outside the shared 19.

The ``VALID_*`` boolean tables say which raw values an encoding may contain at all; a label holding
anything else is the wrong file (an RGB colour label, an instance map, a different release) and the
adapters refuse it with a clear message instead of silently scoring garbage.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 19
IGNORE_INDEX = 255

CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# The official Cityscapes colours of the 19 train classes, in train-id order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)


def _table(mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry uint8 lookup table from a sparse mapping; unlisted values → ``default``."""
    table = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    table.setflags(write=False)
    return table


def _valid(values: list[int] | range) -> np.ndarray:
    """A 256-entry boolean table marking the raw values an encoding may contain."""
    table = np.zeros(256, dtype=bool)
    table[list(values)] = True
    table.setflags(write=False)
    return table


# --------------------------------------------------------------------------------------------------
# Cityscapes label ids (also GTAV's palette indices and ACDC's _gt_labelIds.png)
# --------------------------------------------------------------------------------------------------

# (id, name, colour) for ids 0..33; colours let us write GTAV-style palette PNGs.
CITYSCAPES_LABELS: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (0, "unlabeled", (0, 0, 0)),
    (1, "ego vehicle", (0, 0, 0)),
    (2, "rectification border", (0, 0, 0)),
    (3, "out of roi", (0, 0, 0)),
    (4, "static", (0, 0, 0)),
    (5, "dynamic", (111, 74, 0)),
    (6, "ground", (81, 0, 81)),
    (7, "road", (128, 64, 128)),
    (8, "sidewalk", (244, 35, 232)),
    (9, "parking", (250, 170, 160)),
    (10, "rail track", (230, 150, 140)),
    (11, "building", (70, 70, 70)),
    (12, "wall", (102, 102, 156)),
    (13, "fence", (190, 153, 153)),
    (14, "guard rail", (180, 165, 180)),
    (15, "bridge", (150, 100, 100)),
    (16, "tunnel", (150, 120, 90)),
    (17, "pole", (153, 153, 153)),
    (18, "polegroup", (153, 153, 153)),
    (19, "traffic light", (250, 170, 30)),
    (20, "traffic sign", (220, 220, 0)),
    (21, "vegetation", (107, 142, 35)),
    (22, "terrain", (152, 251, 152)),
    (23, "sky", (70, 130, 180)),
    (24, "person", (220, 20, 60)),
    (25, "rider", (255, 0, 0)),
    (26, "car", (0, 0, 142)),
    (27, "truck", (0, 0, 70)),
    (28, "bus", (0, 60, 100)),
    (29, "caravan", (0, 0, 90)),
    (30, "trailer", (0, 0, 110)),
    (31, "train", (0, 80, 100)),
    (32, "motorcycle", (0, 0, 230)),
    (33, "bicycle", (119, 11, 32)),
)

CITYSCAPES_ID_TO_TRAIN_ID: np.ndarray = _table(
    {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
)
# 0..33 are the ids; 255 is what the -1 "license plate" id becomes in an 8-bit labelIds PNG.
VALID_CITYSCAPES_IDS: np.ndarray = _valid([*range(34), 255])

# The inverse (train id → Cityscapes id), used by the synthetic world and by tests.
TRAIN_ID_TO_CITYSCAPES_ID: np.ndarray = _table(
    {int(t): i for i, t in enumerate(CITYSCAPES_ID_TO_TRAIN_ID) if t != IGNORE_INDEX}, default=0
)

# --------------------------------------------------------------------------------------------------
# Train ids themselves (BDD100K masks, converted files, ACDC _gt_labelTrainIds.png)
# --------------------------------------------------------------------------------------------------

TRAIN_ID_IDENTITY: np.ndarray = _table({i: i for i in range(NUM_CLASSES)})
VALID_TRAIN_IDS: np.ndarray = _valid([*range(NUM_CLASSES), IGNORE_INDEX])

# --------------------------------------------------------------------------------------------------
# Mapillary Vistas v1.2 (66 classes)
# --------------------------------------------------------------------------------------------------

# (id, name, colour) in v1.2 order; the colours are the dataset's config.json colours.
MAPILLARY_V12_LABELS: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (0, "Bird", (165, 42, 42)),
    (1, "Ground Animal", (0, 192, 0)),
    (2, "Curb", (196, 196, 196)),
    (3, "Fence", (190, 153, 153)),
    (4, "Guard Rail", (180, 165, 180)),
    (5, "Barrier", (90, 120, 150)),
    (6, "Wall", (102, 102, 156)),
    (7, "Bike Lane", (128, 64, 255)),
    (8, "Crosswalk - Plain", (140, 140, 200)),
    (9, "Curb Cut", (170, 170, 170)),
    (10, "Parking", (250, 170, 160)),
    (11, "Pedestrian Area", (96, 96, 96)),
    (12, "Rail Track", (230, 150, 140)),
    (13, "Road", (128, 64, 128)),
    (14, "Service Lane", (110, 110, 110)),
    (15, "Sidewalk", (244, 35, 232)),
    (16, "Bridge", (150, 100, 100)),
    (17, "Building", (70, 70, 70)),
    (18, "Tunnel", (150, 120, 90)),
    (19, "Person", (220, 20, 60)),
    (20, "Bicyclist", (255, 0, 0)),
    (21, "Motorcyclist", (255, 0, 100)),
    (22, "Other Rider", (255, 0, 200)),
    (23, "Lane Marking - Crosswalk", (200, 128, 128)),
    (24, "Lane Marking - General", (255, 255, 255)),
    (25, "Mountain", (64, 170, 64)),
    (26, "Sand", (230, 160, 50)),
    (27, "Sky", (70, 130, 180)),
    (28, "Snow", (190, 255, 255)),
    (29, "Terrain", (152, 251, 152)),
    (30, "Vegetation", (107, 142, 35)),
    (31, "Water", (0, 170, 30)),
    (32, "Banner", (255, 255, 128)),
    (33, "Bench", (250, 0, 30)),
    (34, "Bike Rack", (100, 140, 180)),
    (35, "Billboard", (220, 220, 220)),
    (36, "Catch Basin", (220, 128, 128)),
    (37, "CCTV Camera", (222, 40, 40)),
    (38, "Fire Hydrant", (100, 170, 30)),
    (39, "Junction Box", (40, 40, 40)),
    (40, "Mailbox", (33, 33, 33)),
    (41, "Manhole", (100, 128, 160)),
    (42, "Phone Booth", (142, 0, 0)),
    (43, "Pothole", (70, 100, 150)),
    (44, "Street Light", (210, 170, 100)),
    (45, "Pole", (153, 153, 153)),
    (46, "Traffic Sign Frame", (128, 128, 128)),
    (47, "Utility Pole", (0, 0, 80)),
    (48, "Traffic Light", (250, 170, 30)),
    (49, "Traffic Sign (Back)", (192, 192, 192)),
    (50, "Traffic Sign (Front)", (220, 220, 0)),
    (51, "Trash Can", (140, 140, 20)),
    (52, "Bicycle", (119, 11, 32)),
    (53, "Boat", (150, 0, 255)),
    (54, "Bus", (0, 60, 100)),
    (55, "Car", (0, 0, 142)),
    (56, "Caravan", (0, 0, 90)),
    (57, "Motorcycle", (0, 0, 230)),
    (58, "On Rails", (0, 80, 100)),
    (59, "Other Vehicle", (128, 64, 64)),
    (60, "Trailer", (0, 0, 110)),
    (61, "Truck", (0, 0, 70)),
    (62, "Wheeled Slow", (0, 0, 192)),
    (63, "Car Mount", (32, 32, 32)),
    (64, "Ego Vehicle", (120, 10, 10)),
    (65, "Unlabeled", (0, 0, 0)),
)

# The mapping used across the DGSS literature (protocol.md); unlisted ids → 255.
MAPILLARY_V12_TO_TRAIN_ID: np.ndarray = _table(
    {2: 1, 3: 4, 6: 3, 7: 0, 8: 0, 9: 1, 10: 0, 11: 1, 13: 0, 14: 0, 15: 1, 17: 2, 19: 11, 20: 12,
     21: 12, 22: 12, 23: 0, 24: 0, 27: 10, 29: 9, 30: 8, 44: 5, 45: 5, 46: 7, 47: 5, 48: 6, 49: 7,
     50: 7, 52: 18, 54: 15, 55: 13, 57: 17, 58: 16, 61: 14}
)
VALID_MAPILLARY_V12: np.ndarray = _valid(range(66))

# --------------------------------------------------------------------------------------------------
# SYNTHIA (RAND-CITYSCAPES) class ids
# --------------------------------------------------------------------------------------------------

SYNTHIA_CLASSES: tuple[str, ...] = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car",
    "traffic sign", "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work",
    "traffic light", "terrain", "rider", "truck", "bus", "train", "wall", "lanemarking",
)
# SYNTHIA shares 16 of the 19 classes in practice (terrain, truck and train are listed but absent
# from RAND-CITYSCAPES); the map keeps all 19 slots, the benchmark reports 19 classes (protocol.md).
SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = _table(
    {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
     18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
)
VALID_SYNTHIA_IDS: np.ndarray = _valid(range(len(SYNTHIA_CLASSES)))

# --------------------------------------------------------------------------------------------------
# Encodings: name → (lookup table, valid-values table, human description)
# --------------------------------------------------------------------------------------------------

ENCODINGS: dict[str, tuple[np.ndarray, np.ndarray, str]] = {
    "cityscapes_ids": (CITYSCAPES_ID_TO_TRAIN_ID, VALID_CITYSCAPES_IDS, "Cityscapes label ids 0..33 (or 255)"),
    "train_ids": (TRAIN_ID_IDENTITY, VALID_TRAIN_IDS, "train ids 0..18 or 255"),
    "mapillary_v12": (MAPILLARY_V12_TO_TRAIN_ID, VALID_MAPILLARY_V12, "Mapillary v1.2 class ids 0..65"),
    "synthia_ids": (SYNTHIA_ID_TO_TRAIN_ID, VALID_SYNTHIA_IDS, "SYNTHIA class ids 0..22"),
}


def palette_bytes(colours: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...]) -> list[int]:
    """A flat 768-entry PIL palette from a list of colours (rest black), for writing 'P' PNGs."""
    flat = [c for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


def colorize(label: np.ndarray) -> np.ndarray:
    """Colour a train-id map with the Cityscapes palette (ignore → black); returns HxWx3 uint8."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)
    return lut[np.asarray(label, dtype=np.uint8)]
