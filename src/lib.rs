//! egret facade
