"""Evaluation: ADM-protocol Inception metrics (FID, sFID, IS, precision/recall, KID), reconstruction metrics
(rFID, PSNR, SSIM, LPIPS) and layout metrics. See eval/README.md for the protocol."""
