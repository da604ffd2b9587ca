"""Deploys a CloudFormation template (a YAML block of a doc) to moto's
CloudFormation and prints the stack's outputs as one JSON object.

    deploy_stack.py ENDPOINT STACK_NAME MARKDOWN_FILE HEADING [--then-delete]

The template is the first ```yaml block after the line HEADING, so a test
deploys exactly what the docs tell a user to apply. --then-delete removes
the stack once it is complete (a deployment check only)."""

import json
import sys

import boto3

endpoint, stack, markdown, heading = sys.argv[1:5]
then_delete = sys.argv[5:] == ["--then-delete"]
lines = open(markdown).read().splitlines()
start = lines.index(heading)
begin = next(i for i in range(start, len(lines)) if lines[i].strip() == "```yaml")
end = next(i for i in range(begin + 1, len(lines)) if lines[i].strip() == "```")
template = "\n".join(lines[begin + 1 : end])
cloudformation = boto3.client("cloudformation", endpoint_url=endpoint, region_name="us-east-1")
cloudformation.create_stack(StackName=stack, TemplateBody=template)
described = cloudformation.describe_stacks(StackName=stack)["Stacks"][0]
assert described["StackStatus"] == "CREATE_COMPLETE", described["StackStatus"]
if then_delete:
    cloudformation.delete_stack(StackName=stack)
print(json.dumps({o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}))
