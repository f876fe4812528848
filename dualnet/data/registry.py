"""The dataset registry: which files make each dataset, where they are mirrored, and their digests.

Provenance of every digest below (nothing here was invented; nothing could be downloaded on the
machine this table was written on):

* MNIST ``*.gz`` MD5: the sums torchvision checks (also used by many other loaders).  ``*.gz``
  SHA-256 and sizes: published for the same files by TensorFlow/Keras-era loaders and several other
  independent projects (identical values for the ossci-datasets and cvdf-datasets mirrors).
  ``content_sha256`` (of the decompressed IDX bytes): published by several independent projects.
  None of the MNIST sums was computed here: no copy of MNIST was available.
* Fashion-MNIST ``*.gz`` MD5: the table in the official README (shipped in Debian's
  ``dataset-fashion-mnist`` as /usr/share/doc/dataset-fashion-mnist/README.md.gz).  ``*.gz`` SHA-256:
  published by several independent loaders for the official S3 / GitHub copies.  ``content_sha256``:
  COMPUTED HERE from Debian's ``dataset-fashion-mnist`` (0.0~git20200523.55506a9-1) by decompressing its
  four files.  Debian's ``.gz`` files are *not* byte-identical to the official ones (their gzip header
  lacks the stored file name and has another mtime: each is exactly len(name)+1 bytes shorter), but the
  decompressed bytes are the same: these SHA-256s equal independently published ones for the
  decompressed official files, and their MD5s equal the raw-file MD5s torchvision lists.
* CIFAR-10 archive MD5: the official page (https://www.cs.toronto.edu/~kriz/cifar.html, also in
  torchvision).  Archive SHA-256: the value Keras' ``cifar10.load_data`` checks.  Per-batch MD5s: the
  values torchvision checks for the extracted ``cifar-10-batches-py`` files.  Not computed here.

A file passes verification when ANY digest known for it matches: the downloaded file's SHA-256 or MD5,
or (for IDX files) the SHA-256 of its decompressed content, which also accepts re-compressed copies
such as Debian's and raw ``gunzip``-ed files.
"""
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FileSpec:
    """One distributed file.  Digests are lowercase hex; ``None`` = not known.

    ``sha256``/``md5``/``size`` describe the file as distributed (e.g. the ``.gz``);
    ``content_sha256``/``content_size`` describe its decompressed bytes (IDX payload).
    """
    name: str
    size: int = None
    sha256: str = None
    md5: str = None
    content_sha256: str = None
    content_size: int = None

    @property
    def compressed(self):
        return self.name.endswith(".gz")

    def local_names(self):
        """File names accepted on disk: the distributed name, then the gunzip-ed name (IDX only)."""
        if self.compressed and self.content_sha256 is not None:
            return (self.name, self.name[:-3])
        return (self.name,)

    def known(self):
        """True when at least one digest is recorded (so verification is possible)."""
        return any((self.sha256, self.md5, self.content_sha256))


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its files, where to fetch them, and how to describe them to a user.

    ``kind`` is ``'idx'`` (files: train_images, train_labels, test_images, test_labels) or
    ``'cifar'`` (files: archive; members: the extracted batch files).  ``subdirs`` are folder names
    looked for under every search root besides the root itself.  ``system_hint`` tells users how a
    system package provides the files.
    """
    name: str
    kind: str
    files: dict
    mirrors: tuple
    num_classes: int
    input_shape: tuple
    classes: tuple = ()
    members: dict = field(default_factory=dict)
    subdirs: tuple = ()
    system_hint: str = ""
    homepage: str = ""

    def urls(self, file_spec):
        """Download URLs of one file, mirror order."""
        return [mirror + file_spec.name for mirror in self.mirrors]


_IDX_ROLES = ("train_images", "train_labels", "test_images", "test_labels")


def _idx_files(names, sizes, sha256s, md5s, content_sha256s, content_sizes):
    return {role: FileSpec(*values) for role, values in
            zip(_IDX_ROLES, zip(names, sizes, sha256s, md5s, content_sha256s, content_sizes))}


_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_IDX_CONTENT_SIZES = (47040016, 60008, 7840016, 10008)

MNIST = DatasetSpec(
    name="mnist", kind="idx",
    files=_idx_files(
        _IDX_NAMES,
        (9912422, 28881, 1648877, 4542),
        ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
         "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
         "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
         "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        _IDX_CONTENT_SIZES),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    num_classes=10, input_shape=(1, 28, 28), classes=tuple(str(d) for d in range(10)),
    subdirs=("mnist", "MNIST", os.path.join("MNIST", "raw")),
    homepage="http://yann.lecun.com/exdb/mnist/")

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist", kind="idx",
    files=_idx_files(
        _IDX_NAMES,
        (26421880, 29515, 4422102, 5148),
        ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
         "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
         "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
         "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        # computed here from Debian's dataset-fashion-mnist (see the module docstring)
        ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        _IDX_CONTENT_SIZES),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    num_classes=10, input_shape=(1, 28, 28),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
    subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST", os.path.join("FashionMNIST", "raw")),
    system_hint=("on Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` installs the four files "
                 "in /usr/share/datasets/fashion-mnist/, which is searched automatically"),
    homepage="https://github.com/zalandoresearch/fashion-mnist")

CIFAR10 = DatasetSpec(
    name="cifar10", kind="cifar",
    files={"archive": FileSpec("cifar-10-python.tar.gz", 170498071,
                               "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                               "c58f30108f718f92721af3b95e74349a")},
    members={name: FileSpec(name, md5=md5) for name, md5 in (
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ("test_batch", "40351d587109b95175f43aff81a1287e"))},
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    num_classes=10, input_shape=(3, 32, 32),
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    subdirs=("cifar10", "cifar-10", "CIFAR10"),
    homepage="https://www.cs.toronto.edu/~kriz/cifar.html")

REGISTRY = {spec.name: spec for spec in (MNIST, FASHION_MNIST, CIFAR10)}

ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
           "cifar-10": "cifar10", "cifar_10": "cifar10"}
