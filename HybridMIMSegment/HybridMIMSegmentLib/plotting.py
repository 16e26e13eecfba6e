"""The live fine-tuning plot as Slicer's own plot nodes: loss (raw and smoothed) and validation Dice per step.

Why MRML plot nodes: Slicer's plot widget then draws, zooms and exports it like any other chart. The nodes are
created on first use, hidden from the data editors, never saved with the scene, found again by an attribute and
reused by every run (re-created if the scene was closed). Main thread only, like all MRML.
"""

from __future__ import annotations

from collections.abc import Sequence

import slicer
import vtk

from .finetuning import LogRow

ROLE_ATTRIBUTE = "HybridMIMSegment.TrainingPlot"
SMOOTHING_STEPS = 20
LOSS_COLUMNS = ("step", "loss", "smoothed loss")
DICE_COLUMNS = ("step", "validation Dice")
SERIES = (  # role, table role, y column, colour, line width, markers
    ("loss series", "loss table", "loss", (0.70, 0.78, 0.90), 1, False),
    ("smoothed loss series", "loss table", "smoothed loss", (0.15, 0.40, 0.80), 3, False),
    ("Dice series", "Dice table", "validation Dice", (0.90, 0.45, 0.10), 2, True),
)


class TrainingPlot:
    """Owns (finds or makes) the table, series, chart and plot-view nodes of the fine-tuning plot in ``scene``."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self._ids: dict[str, str] = {}

    def _find(self, role: str):
        node = self.scene.GetNodeByID(self._ids.get(role, ""))
        if node is not None and node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node
        for i in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(i)
            if node.GetAttribute(ROLE_ATTRIBUTE) == role:
                self._ids[role] = node.GetID()
                return node
        return None

    def _node(self, class_name: str, role: str):
        """(node, whether it was just made)."""
        node = self._find(role)
        if node is not None:
            return node, False
        node = getattr(slicer, class_name)()
        node.SetName(self.scene.GenerateUniqueName(f"HybridMIM fine-tuning {role}"))
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetHideFromEditors(True)  # set before adding: editors and the subject hierarchy never list it
        node.SetSaveWithScene(False)
        self.scene.AddNode(node)
        self._ids[role] = node.GetID()
        return node, True

    def _table(self, role: str, columns: Sequence[str]):
        table_node, _ = self._node("vtkMRMLTableNode", role)
        table = table_node.GetTable()
        for name in columns:
            if table.GetColumnByName(name) is None:
                column = vtk.vtkDoubleArray()
                column.SetName(name)
                column.SetNumberOfTuples(table.GetNumberOfRows())
                column.Fill(0.0)
                table_node.AddColumn(column)
        return table_node

    def chart_node(self):
        """The chart with its three series, made (or repaired) on demand; cheap when they exist."""
        tables = {"loss table": self._table("loss table", LOSS_COLUMNS),
                  "Dice table": self._table("Dice table", DICE_COLUMNS)}
        chart, created = self._node("vtkMRMLPlotChartNode", "chart")
        if created:
            chart.SetTitle("Fine-tuning")
            chart.SetXAxisTitle("step")
            chart.SetYAxisTitle("loss / Dice")
            chart.SetLegendVisibility(True)
        for role, table_role, column, color, width, markers in SERIES:
            series, created = self._node("vtkMRMLPlotSeriesNode", role)
            if created:
                series.SetName(column)  # the legend shows the node name
                series.SetXColumnName("step")
                series.SetYColumnName(column)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if markers
                                      else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
                series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
                series.SetLineWidth(width)
                series.SetColor(*color)
            if series.GetTableNodeID() != tables[table_role].GetID():
                series.SetAndObserveTableNodeID(tables[table_role].GetID())
            if not chart.HasPlotSeriesNodeID(series.GetID()):
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return chart

    def view_node(self):
        """A plot view node showing the chart, for a ``qMRMLPlotWidget`` embedded in the module panel."""
        chart = self.chart_node()
        view, _ = self._node("vtkMRMLPlotViewNode", "view")  # no layout name: a layout name makes it a singleton
        view.SetDoPropagatePlotChartSelection(False)  # keep this chart when another module shows its own
        if view.GetPlotChartNodeID() != chart.GetID():
            view.SetPlotChartNodeID(chart.GetID())
        return view

    def reset(self) -> None:
        """Empty the plot for a new run."""
        self.chart_node()
        for role in ("loss table", "Dice table"):
            table_node = self._find(role)
            table = table_node.GetTable()
            for i in range(table.GetNumberOfColumns()):
                table.GetColumn(i).SetNumberOfTuples(0)
            table.Modified()
            table_node.Modified()

    def append(self, rows: Sequence[LogRow]) -> None:
        """Add the log rows not plotted yet (the caller keeps count)."""
        if not rows:
            return
        self.chart_node()
        loss_node, dice_node = self._find("loss table"), self._find("Dice table")
        loss_table, dice_table = loss_node.GetTable(), dice_node.GetTable()
        steps, losses, smoothed = (loss_table.GetColumnByName(name) for name in LOSS_COLUMNS)
        dice_steps, dice = (dice_table.GetColumnByName(name) for name in DICE_COLUMNS)
        for row in rows:
            steps.InsertNextValue(row.step)
            losses.InsertNextValue(row.loss)
            count = losses.GetNumberOfTuples()
            window = [losses.GetValue(i) for i in range(max(0, count - SMOOTHING_STEPS), count)]
            smoothed.InsertNextValue(sum(window) / len(window))
            if row.validation_dice is not None:
                dice_steps.InsertNextValue(row.step)
                dice.InsertNextValue(row.validation_dice)
        for node in (loss_node, dice_node):
            node.GetTable().Modified()
            node.Modified()

    def remove(self) -> None:
        """Remove every node of the plot from the scene."""
        for role in ("view", "chart", *(s[0] for s in SERIES), "loss table", "Dice table"):
            node = self._find(role)
            if node is not None:
                self.scene.RemoveNode(node)
