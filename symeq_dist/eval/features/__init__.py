"""Feature networks for Fréchet distances: the dataset's classifier (FD-clf, `classifier.py`) and pytorch-fid's
InceptionV3 (FID, `inception.py`, local weights only), behind `base.FeatureExtractor`."""

from symeq_dist.eval.features.base import FeatureExtractor
from symeq_dist.eval.features.classifier import ClassifierFeatures, load_classifier_features, train_classifier
from symeq_dist.eval.features.inception import INCEPTION_FILE, InceptionFeatures, load_inception_features

__all__ = ["INCEPTION_FILE", "ClassifierFeatures", "FeatureExtractor", "InceptionFeatures",
           "load_classifier_features", "load_inception_features", "train_classifier"]
