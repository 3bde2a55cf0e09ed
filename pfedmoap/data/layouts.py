"""Where each on-disk dataset lives under ``--data-root``: one table for the loaders' error messages and for tools
that tell a user where to put the files (``FOLDERS``: the top folder; ``LAYOUTS``: the whole layout on one line).

The layouts are CoOp's ``DATASETS.md`` (the 11 datasets and the ImageNet variants) and Dassl's (the domain
datasets); the loaders read exactly these paths. Plain strings only, so that anything may import this module.
"""

from __future__ import annotations

# dataset name -> the folder directly under --data-root that the loader reads (Fashion-MNIST: see LAYOUTS)
FOLDERS: dict[str, str] = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "fashion-mnist": "FashionMNIST",
    # CoOp's 11
    "imagenet": "imagenet",
    "caltech101": "caltech-101",
    "oxfordpets": "oxford_pets",
    "stanfordcars": "stanford_cars",
    "flowers102": "oxford_flowers",
    "food101": "food-101",
    "fgvcaircraft": "fgvc_aircraft",
    "sun397": "sun397",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "ucf101": "ucf101",
    # ImageNet variants (evaluation only)
    "imagenet-v2": "imagenetv2",
    "imagenet-sketch": "imagenet-sketch",
    "imagenet-a": "imagenet-adversarial",
    "imagenet-r": "imagenet-rendition",
    # domain datasets
    "pacs": "pacs",
    "office-home": "office_home_dg",
    "office31": "office31",
    "domainnet": "domainnet",
    "domainnet-345": "domainnet",
    "office-caltech10": "office_caltech_10",
}

_VARIANT_NAMES = "classnames.txt in {folder}/ (else imagenet/classnames.txt)"

# dataset name -> its layout under --data-root, one line
LAYOUTS: dict[str, str] = {
    "cifar10": "cifar-10-batches-py/ (the python version of CIFAR10)",
    "cifar100": "cifar-100-python/ (the python version of CIFAR100)",
    "fashion-mnist": "FashionMNIST/raw/<4 idx files> as torchvision writes it, or the four *-idx?-ubyte.gz files",
    "imagenet": "imagenet/images/{train,val}/<wnid>/*.JPEG and imagenet/classnames.txt ('wnid name' per line)",
    "caltech101": "caltech-101/101_ObjectCategories/ and caltech-101/split_zhou_Caltech101.json",
    "oxfordpets": "oxford_pets/images/ and oxford_pets/split_zhou_OxfordPets.json",
    "stanfordcars": "stanford_cars/{cars_train,cars_test}/ and stanford_cars/split_zhou_StanfordCars.json",
    "flowers102": "oxford_flowers/jpg/ and oxford_flowers/split_zhou_OxfordFlowers.json",
    "food101": "food-101/images/ and food-101/split_zhou_Food101.json",
    "fgvcaircraft": "fgvc_aircraft/images/ and fgvc_aircraft/{variants.txt,images_variant_train.txt,"
    "images_variant_test.txt} (the data/ folder of fgvc-aircraft-2013b.tar.gz, renamed)",
    "sun397": "sun397/SUN397/ and sun397/split_zhou_SUN397.json",
    "dtd": "dtd/images/ and dtd/split_zhou_DescribableTextures.json",
    "eurosat": "eurosat/2750/ and eurosat/split_zhou_EuroSAT.json",
    "ucf101": "ucf101/UCF-101-midframes/ and ucf101/split_zhou_UCF101.json",
    "imagenet-v2": "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/ and "
    + _VARIANT_NAMES.format(folder="imagenetv2"),
    "imagenet-sketch": "imagenet-sketch/images/<wnid>/ and " + _VARIANT_NAMES.format(folder="imagenet-sketch"),
    "imagenet-a": "imagenet-adversarial/imagenet-a/<wnid>/ (200 folders) and "
    + _VARIANT_NAMES.format(folder="imagenet-adversarial"),
    "imagenet-r": "imagenet-rendition/imagenet-r/<wnid>/ (200 folders) and "
    + _VARIANT_NAMES.format(folder="imagenet-rendition"),
    "pacs": "pacs/images/<domain>/<class>/ and pacs/splits/<domain>_{train,crossval,test}_kfold.txt for domains "
    "art_painting, cartoon, photo, sketch",
    "office-home": "office_home_dg/<domain>/{train,val}/<class>/ for domains art, clipart, product, real_world",
    "office31": "office31/<domain>/<class>/*.jpg for domains amazon, dslr, webcam",
    "domainnet": "domainnet/<domain>/<class>/*.jpg for domains clipart, infograph, painting, quickdraw, real, sketch",
    "domainnet-345": "domainnet/<domain>/<class>/ and domainnet/splits/<domain>_{train,test}.txt for domains "
    "clipart, infograph, painting, quickdraw, real, sketch",
    "office-caltech10": "office_caltech_10/<domain>/<class>/*.jpg for domains amazon, caltech, dslr, webcam",
}
