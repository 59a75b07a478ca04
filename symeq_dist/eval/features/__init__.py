"""Feature networks for Fréchet distances: the dataset's own network (FD-clf, `classifier.py`; what it learns,
class labels, attributes, mask classes or rotations, follows the manifest: `targets.py`) and pytorch-fid's
InceptionV3 (FID, `inception.py`, local weights only), behind `base.FeatureExtractor`."""

from symeq_dist.eval.features.base import FeatureExtractor
from symeq_dist.eval.features.classifier import ClassifierFeatures, load_classifier_features, train_classifier
from symeq_dist.eval.features.inception import INCEPTION_FILE, InceptionFeatures, load_inception_features
from symeq_dist.eval.features.targets import FeatureTarget, feature_target

__all__ = ["INCEPTION_FILE", "ClassifierFeatures", "FeatureExtractor", "FeatureTarget", "InceptionFeatures",
           "feature_target", "load_classifier_features", "load_inception_features", "train_classifier"]
