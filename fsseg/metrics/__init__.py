from fsseg.metrics.fss_iou import FewShotIoU, episode_inter_union

__all__ = ["FewShotIoU", "episode_inter_union"]
