"""Published COCO val2017 box AP of the models the benchmark compares, with their sources."""

DINO_README = "https://github.com/IDEA-Research/DINO#model-zoo"
D2_MODEL_ZOO = "https://github.com/facebookresearch/detectron2/blob/main/MODEL_ZOO.md"

# config name -> list of (schedule, box AP, source)
PUBLISHED_AP = {
    "dino_r50_4scale": [("12ep", 49.0, DINO_README), ("24ep", 50.4, DINO_README), ("36ep", 50.9, DINO_README)],
    "dino_r50_5scale": [("12ep", 49.4, DINO_README), ("24ep", 51.3, DINO_README), ("36ep", 51.2, DINO_README)],
    "dino_swinl_4scale": [("12ep", 56.8, DINO_README), ("36ep", 58.0, DINO_README)],
    "dino_swinl_5scale": [("12ep", 57.3, DINO_README), ("36ep", 58.5, DINO_README)],
    "faster_rcnn_R_50_FPN": [("1x", 37.9, D2_MODEL_ZOO), ("3x", 40.2, D2_MODEL_ZOO)],
    "retinanet_R_50_FPN": [("1x", 37.4, D2_MODEL_ZOO), ("3x", 38.7, D2_MODEL_ZOO)],
}
